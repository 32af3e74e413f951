"""Real PostgreSQL and Redis for tests.

Locally a missing server skips its tests; in CI (CI=true, or
NEXGATE_REQUIRE_SERVICES=1) a missing server fails them, so CI can never pass
by skipping.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import pytest

POSTGRES_URL = os.environ.get("NEXGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("NEXGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def services_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("NEXGATE_REQUIRE_SERVICES") == "1"


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 0), timeout=1):
            return True
    except OSError:
        return False


def require(url: str, what: str) -> str:
    """Return the URL if the server answers; otherwise skip (locally) or fail (CI)."""
    if _reachable(url):
        return url
    message = f"{what} is not reachable at {url}"
    if services_required():
        pytest.fail(message + " (required in CI)")
    pytest.skip(message)
    raise AssertionError("unreachable")


def require_postgres() -> str:
    return require(POSTGRES_URL, "PostgreSQL")


def require_redis() -> str:
    return require(REDIS_URL, "Redis")
