"""Shared fixtures: a real fake upstream and a real gateway, both on sockets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import pytest
from aiohttp import web

from nexgate_proxy.app import build_app
from nexgate_proxy.config import parse_config
from nexgate_proxy.runner import GatewayRunner
from tests.fakes import FakeUpstream

PROVIDER_KEY = "sk-provider-secret-0123456789"


@dataclass
class Gateway:
    app: web.Application
    runner: web.AppRunner
    port: int

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
    }
    config.update(overrides)
    return config


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """Start gateways on real sockets: ``await start_gateway(config_dict, plugins=[...])``.

    Without a ``storage`` section each gateway gets its own SQLite file under tmp_path.
    """
    runners: list[web.AppRunner] = []

    async def start(config: dict[str, Any], plugins: Sequence[object] = ()) -> Gateway:
        config = {"storage": {"url": f"sqlite:///{tmp_path}/gw{len(runners)}.db"}, **config}
        app = build_app(parse_config(config, "test-config"), extra_plugins=plugins)
        runner = GatewayRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return Gateway(app, runner, port)

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
