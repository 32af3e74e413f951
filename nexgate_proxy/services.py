"""Shared infrastructure every plugin may use: the durable store, its change feed, the Redis client and the bus.

Opened once per worker at startup, before any plugin starts, and closed after
every plugin stopped (in reverse). The feed hands key and organization changes
(and "you may have missed something") to the bus's local subscribers: one
eviction code path, whoever made the change. With ``state.url`` on Redis the
worker holds two connections to it: the client's (``REDIS``: every plugin's
scripts and the bus's publishes, one circuit breaker) and the bus's subscriber.
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator, Callable

from aiohttp import web

from .appkeys import BUS, CONFIG, FEED, REDIS, STORE
from .state.bus import InvalidationBus, RedisBus, open_bus
from .state.redis import RedisClient, process_client_name
from .store import API_KEY_CHANGE, MISSED, ORG_CHANGE, StoreChange, open_store

log = logging.getLogger("nexgate.services")


async def services_context(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    async with contextlib.AsyncExitStack() as opened:  # closes what was opened, in reverse, also on failure
        store = await open_store(config.storage_url)
        opened.push_async_callback(store.close)
        if config.storage_migrate_on_start:
            applied = await store.migrate()
            if applied:
                log.info("applied store migrations %s", applied)
        await store.check_schema()
        redis = None
        if config.state_url.split(":", 1)[0].lower() in ("redis", "rediss", "unix"):
            redis = RedisClient(config.state_url)  # named nexgate-<pid> in CLIENT LIST
            opened.push_async_callback(redis.close)
            await redis.start()
        bus = (open_bus(config.state_url) if redis is None
               else RedisBus(redis, client_name=process_client_name("nexgate-bus")))
        opened.push_async_callback(bus.close)
        await bus.start()
        feed = store.change_feed()
        feed.subscribe(_evictions_to(bus))
        opened.push_async_callback(feed.close)
        await feed.start()
        app[STORE] = store
        if redis is not None:
            app[REDIS] = redis
        app[BUS] = bus
        app[FEED] = feed
        yield


_EVICTING = {API_KEY_CHANGE, ORG_CHANGE, MISSED.kind}


def _evictions_to(bus: InvalidationBus) -> Callable[[StoreChange], None]:
    def deliver(change: StoreChange) -> None:
        if change.kind in _EVICTING:
            bus.deliver_local(change.kind, change.subject)

    return deliver


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
