"""Shared infrastructure every plugin may use: the durable store, the Redis client and the invalidation bus.

Opened once per worker at startup, before any plugin starts, and closed after
every plugin stopped. With ``state.url`` on Redis the worker holds two
connections to it: the client's (``REDIS``: every plugin's scripts and the bus's
publishes, one circuit breaker) and the bus's subscriber connection.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

from aiohttp import web

from .appkeys import BUS, CONFIG, REDIS, STORE
from .state.bus import RedisBus, open_bus
from .state.redis import RedisClient, process_client_name
from .store import open_store

log = logging.getLogger("nexgate.services")


async def services_context(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = await open_store(config.storage_url)
    try:
        if config.storage_migrate_on_start:
            applied = await store.migrate()
            if applied:
                log.info("applied store migrations %s", applied)
        await store.check_schema()
    except BaseException:
        await store.close()
        raise
    redis = None
    if config.state_url.split(":", 1)[0].lower() in ("redis", "rediss", "unix"):
        redis = RedisClient(config.state_url)  # named nexgate-<pid> in CLIENT LIST
    try:
        if redis is not None:
            await redis.start()
        bus = (open_bus(config.state_url) if redis is None
               else RedisBus(redis, client_name=process_client_name("nexgate-bus")))
        await bus.start()
    except BaseException:
        if redis is not None:
            await redis.close()
        await store.close()
        raise
    app[STORE] = store
    if redis is not None:
        app[REDIS] = redis
    app[BUS] = bus
    try:
        yield
    finally:
        await bus.close()
        if redis is not None:
            await redis.close()
        await store.close()


async def readiness(app: web.Application) -> list[tuple[str, bool]]:
    """The core's own checks for /readyz: the store answers and the bus is connected."""
    checks = []
    try:
        await app[STORE].ping()
        checks.append(("storage", True))
    except Exception:
        checks.append(("storage", False))
    connected = getattr(app[BUS], "connected", True)
    checks.append(("state", bool(connected)))
    return checks
