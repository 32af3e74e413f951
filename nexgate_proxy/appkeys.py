"""Typed keys for what the core keeps on the aiohttp application (no module singletons)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .config import Config
    from .plugins import HookChain
    from .providers.base import Provider
    from .proxy import Proxy

CONFIG: web.AppKey[Config] = web.AppKey("nexgate.config")
CHAIN: web.AppKey[HookChain] = web.AppKey("nexgate.chain")
PROVIDERS: web.AppKey[dict[str, Provider]] = web.AppKey("nexgate.providers")
PROXY: web.AppKey[Proxy] = web.AppKey("nexgate.proxy")
