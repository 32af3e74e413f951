"""Shared fixtures: a real fake upstream and a real gateway, both on sockets."""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web

from nexgate_proxy.accounts import create_api_key
from nexgate_proxy.app import build_app
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.config import parse_config
from nexgate_proxy.runner import GatewayRunner
from tests.fakes import FakeUpstream
from tests.services import require_postgres, require_redis

PROVIDER_KEY = "sk-provider-secret-0123456789"


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


def gateway_config(upstream: FakeUpstream, **overrides: Any) -> dict[str, Any]:
    """A config routing a few aliases to the fake upstream; override any top-level section."""
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


StartGateway = Callable[..., Awaitable[Gateway]]


def with_search_path(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def store_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A URL to an empty database of the backend under test.

    PostgreSQL tests each get a fresh schema (``search_path`` in the URL, which
    asyncpg passes to the server), dropped afterwards.
    """
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'nexgate.db'}"
        return
    async with fresh_postgres_schema() as url:
        yield url


@asynccontextmanager
async def fresh_postgres_schema() -> AsyncIterator[str]:
    """A URL to a new, empty PostgreSQL schema, dropped on exit."""
    base_url = require_postgres()
    schema = f"t_{secrets.token_hex(8)}"
    admin = await asyncpg.connect(base_url)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield with_search_path(base_url, schema)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    async with fresh_postgres_schema() as url:
        yield url


@pytest.fixture
def redis_url() -> str:
    return require_redis()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """Start gateways on real sockets: ``await start_gateway(config_dict, plugins=[...])``.

    Without ``storage`` / ``usage`` sections each gateway gets its own SQLite file
    and outbox directory under tmp_path.
    """
    runners: list[web.AppRunner] = []

    async def start(config: dict[str, Any], plugins: Sequence[object] = ()) -> Gateway:
        config = {"storage": {"url": f"sqlite:///{tmp_path}/gw{len(runners)}.db"},
                  "usage": {"outbox_dir": str(tmp_path / f"outbox{len(runners)}")}, **config}
        app = build_app(parse_config(config, "test-config"), extra_plugins=plugins)
        runner = GatewayRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        user = await app[STORE].create_user(email=f"user{len(runners)}@example.com", name="Test User")
        key = await create_api_key(app[STORE], name="test", user_id=user.id, bcrypt_rounds=4)
        return Gateway(app, runner, port, key.plaintext, user.id)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def gateway(upstream: FakeUpstream, start_gateway: StartGateway) -> Gateway:
    return await start_gateway(gateway_config(upstream))


class RecordingPlugin:
    """A temporary plugin that keeps every usage record and counts settle calls."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.settled: list[str] = []

    from nexgate_proxy import hookimpl as _hookimpl

    @_hookimpl
    def nexgate_settle(self, ctx: Any) -> None:
        self.settled.append(ctx.request_id)

    @_hookimpl
    def nexgate_record(self, record: Any) -> None:
        self.records.append(record)
