"""Real gateways on real sockets, configured against a fake upstream."""

from __future__ import annotations

import hashlib

from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Sequence

from aiohttp import web

from .. import hookimpl
from ..accounts import create_api_key
from ..app import build_app
from ..appkeys import STORE
from ..config import parse_config
from ..runner import GatewayRunner
from .upstream import FakeUpstream

if TYPE_CHECKING:
    import openai

PROVIDER_KEY = "sk-provider-secret-0123456789"
"""The provider key ``gateway_config`` gives the fake upstream (assert it never leaks)."""


@dataclass
class Gateway:
    app: web.Application
    runner: web.AppRunner
    port: int
    api_key: str
    """A real NexGate key of a test user, created at start."""
    user_id: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base(self) -> str:
        return f"{self.url}/v1"

    def openai_client(self, api_key: str | None = None) -> openai.AsyncOpenAI:
        """The official SDK pointed at this gateway, with the test user's key unless given another; no retries."""
        import openai  # the SDK is a test extra, not a dependency of the gateway

        return openai.AsyncOpenAI(base_url=self.openai_base, api_key=api_key or self.api_key, max_retries=0)


StartGateway = Callable[..., Awaitable[Gateway]]
"""``await start_gateway(config_dict, plugins=[...])``: see ``running_gateways``."""


def gateway_config(upstream: FakeUpstream, **overrides: Any) -> dict[str, Any]:
    """A config routing a few aliases to the fake upstream; override any top-level section.

    ``gpt-test`` goes to the upstream's OpenAI API (as ``upstream-model``),
    ``claude-test`` to its Anthropic API (as ``claude-upstream``); both are free.
    """
    config: dict[str, Any] = {
        "providers": {
            "fake": {"type": "openai", "base_url": upstream.url, "api_key": PROVIDER_KEY},
            "fake-anthropic": {"type": "anthropic", "base_url": upstream.base, "api_key": PROVIDER_KEY},
        },
        "models": {
            "gpt-test": {"route": [{"provider": "fake", "model": "upstream-model"}], "free": True},
            "claude-test": {"route": [{"provider": "fake-anthropic", "model": "claude-upstream"}], "free": True},
        },
        "auth": {"bcrypt_rounds": 4},  # bcrypt's cost is not what these tests measure
    }
    config.update(overrides)
    return config


@asynccontextmanager
async def running_gateways(directory: Path) -> AsyncIterator[StartGateway]:
    """Start gateways on real sockets: ``await start(config_dict, plugins=[...])``; all stop on exit.

    ``plugins`` are registered for that gateway only, after the built-ins. Without
    ``storage`` / ``usage`` sections each gateway gets its own SQLite file and
    outbox directory under ``directory`` (and, on another store, a key verifiers file there too). Each gateway has a test user with a
    real API key (``Gateway.api_key``).
    """
    runners: list[web.AppRunner] = []

    async def start(config: dict[str, Any], plugins: Sequence[object] = ()) -> Gateway:
        config = {"storage": {"url": f"sqlite:///{directory}/gw{len(runners)}.db"},
                  "usage": {"outbox_dir": str(directory / f"outbox{len(runners)}")}, **config}
        store = str(config["storage"].get("url", ""))
        if not store.startswith("sqlite"):
            # Fast key verifiers persist next to a SQLite store, else in the working directory: keep
            # them under the test's directory, one file per store so a restarted gateway finds its own.
            auth = config["auth"] = dict(config.get("auth") or {})
            name = hashlib.sha256(store.encode()).hexdigest()[:12]
            auth.setdefault("verifiers", {"file": str(directory / f"verifiers-{name}")})
        app = build_app(parse_config(config, "test-config"), extra_plugins=plugins)
        runner = GatewayRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        user = await app[STORE].create_user(email=f"user{len(runners)}@example.com", name="Test User")
        key = await create_api_key(app[STORE], name="test", user_id=user.id, bcrypt_rounds=4)
        return Gateway(app, runner, port, key.plaintext, user.id)

    try:
        yield start
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def chat(gw: Gateway, key: str | None = None, model: str = "gpt-test") -> str:
    """One chat completion through the official SDK; returns the answer's text."""
    reply = await gw.openai_client(key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}])
    return reply.choices[0].message.content or ""


class RecordingPlugin:
    """A temporary plugin that keeps every usage record and counts settle calls."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.settled: list[str] = []

    @hookimpl
    def nexgate_settle(self, ctx: Any) -> None:
        self.settled.append(ctx.request_id)

    @hookimpl
    def nexgate_record(self, record: Any) -> None:
        self.records.append(record)
