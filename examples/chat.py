"""Call NexGate with the official OpenAI SDK.

    nexgate serve --demo          # in one terminal
    python examples/chat.py       # in another
"""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("NEXGATE_URL", "http://127.0.0.1:8080/v1"),
                api_key=os.environ.get("NEXGATE_API_KEY", "demo"))

reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello, gateway!"}])
print(reply.choices[0].message.content)

for chunk in client.chat.completions.create(model="demo", stream=True,
                                            messages=[{"role": "user", "content": "Stream me, please"}]):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
