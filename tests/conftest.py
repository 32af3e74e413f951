"""This repo's short fixture names over the test kit (``nexgate_proxy.testing``).

The kit's pytest plugin gives the ``nexgate_*`` fixtures; the project's tests
use the short names below. ``backend`` and ``store_url`` are defined here (not
aliased) so a test's ``@pytest.mark.parametrize("backend", [...])`` still
picks the backend its ``store_url`` opens.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest

from nexgate_proxy.testing import FakeUpstream, Gateway, StartGateway, store_url_for


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
