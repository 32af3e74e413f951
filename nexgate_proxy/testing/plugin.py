"""The ``nexgate`` pytest plugin (entry point ``pytest11``): fixtures for testing NexGate plugins.

Every fixture name starts with ``nexgate_`` so it never clashes with a
project's own ``upstream``, ``gateway`` or ``backend``; kit fixtures depend
only on each other, so overriding one of yours cannot break them.

- ``nexgate_upstream``: a started ``FakeUpstream`` (OpenAI and Anthropic APIs).
- ``nexgate_start_gateway``: ``await nexgate_start_gateway(config, plugins=[...])``
  starts a real gateway on a socket and returns a ``Gateway``; all stop after the test.
- ``nexgate_gateway``: one gateway with ``gateway_config(nexgate_upstream)``.
- ``nexgate_backend``: ``"sqlite"`` and ``"postgres"`` (marked ``postgres``), one run each.
- ``nexgate_store_url``: an empty database of that backend.
- ``nexgate_postgres_url`` / ``nexgate_redis_url``: a fresh PostgreSQL schema / the Redis URL.

A missing PostgreSQL or Redis skips its tests locally and fails them in CI
(``CI=true`` or ``NEXGATE_REQUIRE_SERVICES=1``). Importing this module stays
cheap and works without the test extras: the gateway, drivers and SDKs load
inside the fixtures, and without pytest-asyncio the async fixtures fail with
the install hint instead of breaking the whole pytest run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import pytest

try:
    import pytest_asyncio
except ImportError:  # the test extra is not installed: only the async fixtures need it
    pytest_asyncio = None

if TYPE_CHECKING:
    from .gateway import Gateway, StartGateway
    from .upstream import FakeUpstream

_NEEDS_ASYNCIO = ("the nexgate_* async fixtures need pytest-asyncio: pip install \"nexgate[test]\" "
                  "and set asyncio_mode = \"auto\" under [tool.pytest.ini_options]")


def _async_fixture(fn: Callable[..., Any]) -> Any:
    if pytest_asyncio is not None:
        return pytest_asyncio.fixture(fn)

    @pytest.fixture(name=fn.__name__)
    def missing_pytest_asyncio() -> None:
        pytest.fail(_NEEDS_ASYNCIO)

    missing_pytest_asyncio.__doc__ = fn.__doc__
    return missing_pytest_asyncio


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: needs the PostgreSQL server at NEXGATE_TEST_POSTGRES_URL")
    config.addinivalue_line("markers", "redis: needs the Redis server at NEXGATE_TEST_REDIS_URL")


@_async_fixture
async def nexgate_upstream() -> AsyncIterator[FakeUpstream]:
    """A fake OpenAI/Anthropic provider on a socket; script it through ``.behaviour``."""
    from .upstream import FakeUpstream

    async with FakeUpstream() as fake:
        yield fake


@_async_fixture
async def nexgate_start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """``await nexgate_start_gateway(config_dict, plugins=[...])`` -> a running ``Gateway``."""
    from .gateway import running_gateways

    async with running_gateways(tmp_path) as start:
        yield start


@_async_fixture
async def nexgate_gateway(nexgate_upstream: FakeUpstream, nexgate_start_gateway: StartGateway) -> Gateway:
    """A gateway with the built-in plugins, routing ``gpt-test`` and ``claude-test`` to ``nexgate_upstream``."""
    from .gateway import gateway_config

    return await nexgate_start_gateway(gateway_config(nexgate_upstream))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def nexgate_backend(request: pytest.FixtureRequest) -> str:
    """The store backend under test; ``@pytest.mark.parametrize("nexgate_backend", ["sqlite"])`` picks one."""
    return request.param


@_async_fixture
async def nexgate_store_url(nexgate_backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A URL to an empty database of ``nexgate_backend`` (PostgreSQL: a fresh schema, dropped afterwards)."""
    from .services import store_url_for

    async with store_url_for(nexgate_backend, tmp_path) as url:
        yield url


@_async_fixture
async def nexgate_postgres_url() -> AsyncIterator[str]:
    """A URL to a fresh, empty PostgreSQL schema, dropped afterwards."""
    from .services import fresh_postgres_schema

    async with fresh_postgres_schema() as url:
        yield url


@pytest.fixture
def nexgate_redis_url() -> str:
    """The test Redis (NEXGATE_TEST_REDIS_URL, default db 15); keys are not flushed."""
    from .services import require_redis

    return require_redis()
