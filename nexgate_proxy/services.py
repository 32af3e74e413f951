"""Shared infrastructure every plugin may use: the durable store, its change feed and the invalidation bus.

Opened once per worker at startup, before any plugin starts, and closed after
every plugin stopped. The feed hands key and organization changes (and "you may
have missed something") to the bus's local subscribers: one eviction code path,
whoever made the change.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator, Callable

from aiohttp import web

from .appkeys import BUS, CONFIG, FEED, STORE
from .state.bus import InvalidationBus, open_bus
from .store import API_KEY_CHANGE, MISSED, ORG_CHANGE, ChangeFeed, StoreChange, open_store

log = logging.getLogger("nexgate.services")


async def services_context(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = await open_store(config.storage_url)
    bus: InvalidationBus | None = None
    feed: ChangeFeed | None = None
    try:
        if config.storage_migrate_on_start:
            applied = await store.migrate()
            if applied:
                log.info("applied store migrations %s", applied)
        await store.check_schema()
        bus = open_bus(config.state_url)
        feed = store.change_feed()
        feed.subscribe(_evictions_to(bus))
        await bus.start()
        await feed.start()
    except BaseException:
        if feed is not None:
            await feed.close()
        if bus is not None:
            await bus.close()
        await store.close()
        raise
    app[STORE] = store
    app[BUS] = bus
    app[FEED] = feed
    try:
        yield
    finally:
        await feed.close()
        await bus.close()
        await store.close()


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
