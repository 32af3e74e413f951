"""Call NexGate's Anthropic endpoint with the official Anthropic SDK (demo model)."""

import os

from anthropic import Anthropic

client = Anthropic(base_url=os.environ.get("NEXGATE_URL", "http://127.0.0.1:8080"),
                   api_key=os.environ.get("NEXGATE_API_KEY", "demo"))
message = client.messages.create(model="claude-demo", max_tokens=100,
                                 messages=[{"role": "user", "content": "Bonjour!"}])
print(message.content[0].text)
