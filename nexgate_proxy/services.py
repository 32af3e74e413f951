"""Shared infrastructure every plugin may use: the durable store and the invalidation bus.

Opened once per worker at startup, before any plugin starts, and closed after
every plugin stopped.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

from aiohttp import web

from .appkeys import BUS, CONFIG, STORE
from .state.bus import open_bus
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
        bus = open_bus(config.state_url)
        await bus.start()
    except BaseException:
        await store.close()
        raise
    app[STORE] = store
    app[BUS] = bus
    try:
        yield
    finally:
        await bus.close()
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
