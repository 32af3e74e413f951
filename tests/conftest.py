"""This repo's short fixture names over the test kit (``nexgate_proxy.testing``).

The kit's pytest plugin gives the ``nexgate_*`` fixtures; the project's tests
use the short names below. ``backend`` and ``store_url`` are defined here (not
aliased) so a test's ``@pytest.mark.parametrize("backend", [...])`` still
picks the backend its ``store_url`` opens.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import AsyncIterator

import pytest

from nexgate_proxy.testing import FakeUpstream, Gateway, StartGateway, free_port, store_url_for


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("nexgate"):
        raise pytest.UsageError("the nexgate pytest plugin is not loaded: reinstall with "
                                "`pip install -e '.[test]'` (it registers the pytest11 entry point)")


@pytest.fixture
def upstream(nexgate_upstream: FakeUpstream) -> FakeUpstream:
    return nexgate_upstream


@pytest.fixture
def start_gateway(nexgate_start_gateway: StartGateway) -> StartGateway:
    return nexgate_start_gateway


@pytest.fixture
def gateway(nexgate_gateway: Gateway) -> Gateway:
    return nexgate_gateway


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def store_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A URL to an empty database of the backend under test."""
    async with store_url_for(backend, tmp_path) as url:
        yield url


@pytest.fixture
def postgres_url(nexgate_postgres_url: str) -> str:
    return nexgate_postgres_url


@pytest.fixture
def redis_url(nexgate_redis_url: str) -> str:
    return nexgate_redis_url


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[tuple[str, subprocess.Popen]]:
    """A throwaway redis-server on its own port, for tests that kill it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the throwaway redis-server did not start")
            await asyncio.sleep(0.02)
    yield f"redis://127.0.0.1:{port}/0", proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
