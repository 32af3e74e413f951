"""`nexgate serve --demo`: the real gateway, an offline echo provider, and a key to try it with.

The demo keeps its store in memory, so each run creates a fresh demo user and
API key and prints them; nothing is left on disk.
"""

from __future__ import annotations

from typing import AsyncIterator

from aiohttp import web

from . import hookimpl
from .accounts import create_api_key
from .appkeys import CONFIG, STORE


class DemoSeed:
    """A plugin that creates the demo's user and key once the store is open."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    @hookimpl
    async def nexgate_lifespan(self, app: web.Application) -> AsyncIterator[None]:
        store = app[STORE]
        user = await store.create_user(name="Demo user")
        key = await create_api_key(store, name="demo", user_id=user.id)
        models = ", ".join(app[CONFIG].models)
        base = f"http://{self.host}:{self.port}"
        print(
            f"NexGate demo: an offline echo provider behind models {models}.\n"
            f"Demo API key (this run only): {key.plaintext}\n"
            f"Try: curl {base}/v1/chat/completions -H 'Authorization: Bearer {key.plaintext}' "
            "-H 'Content-Type: application/json' "
            "-d '{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'\n"
            f"Or:  NEXGATE_API_KEY={key.plaintext} python examples/chat.py",
            flush=True,
        )
        yield
