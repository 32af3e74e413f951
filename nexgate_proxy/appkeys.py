"""Typed keys for what the core keeps on the aiohttp application (no module singletons)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .abuse import AbuseGuard
    from .state.bus import InvalidationBus
    from .config import Config
    from .plugins import HookChain
    from .providers.base import Provider
    from .proxy import Proxy
    from .state.redis import RedisClient
    from .store import ChangeFeed, Store

CONFIG: web.AppKey[Config] = web.AppKey("nexgate.config")
CHAIN: web.AppKey[HookChain] = web.AppKey("nexgate.chain")
PROVIDERS: web.AppKey[dict[str, Provider]] = web.AppKey("nexgate.providers")
PROXY: web.AppKey[Proxy] = web.AppKey("nexgate.proxy")
STORE: web.AppKey[Store] = web.AppKey("nexgate.store")
"""The durable store, opened at startup (before plugins start)."""
BUS: web.AppKey[InvalidationBus] = web.AppKey("nexgate.bus")
"""Cache invalidations: the store feed's key and organization changes, and hot-state events (IP bans)."""
FEED: web.AppKey[ChangeFeed] = web.AppKey("nexgate.feed")
"""The store's change feed (started before plugins start): subscribe for credits and other store changes."""
REDIS: web.AppKey[RedisClient] = web.AppKey("nexgate.redis")
"""The process's one Redis client (one connection, one circuit breaker), set when ``state.url`` is Redis."""
ABUSE: web.AppKey[AbuseGuard] = web.AppKey("nexgate.abuse")
"""IP lists, bans and failure budgets shared by every authenticated surface (see ``nexgate_proxy.abuse``)."""
