"""The abuse guard: one mechanism every authenticated surface shares (IP lists, bans, failure budgets).

The ratelimit plugin publishes its guard at ``app[ABUSE]`` (``nexgate_proxy.appkeys``); the proxy's
own routes, the admin API, ``/metrics`` and the auth plugin reach it there, never by importing the
plugin. Without the plugin (disabled) there is no guard and nothing is checked.
"""

from __future__ import annotations

from typing import Awaitable, Protocol

from aiohttp import web

from .appkeys import CONFIG
from .clientip import client_ip
from .errors import GatewayError


class AbuseGuard(Protocol):
    def check(self, ip: str) -> GatewayError | None:
        """The refusal for a denied, not allowed or banned IP, or None. Local dict lookups, no I/O."""

    def count(self, ip: str, *, failed: bool = False, key_id: str | None = None) -> Awaitable[None] | None:
        """Count a request handled outside the proxy's admit/settle against the IP's rate (``limits.ip.rpm``),
        and, when ``failed``, a failed authentication of the IP (and of the public key id ``key_id``) toward
        the bans. Returns what to await, or None when there is nothing to count."""

    def key_locked_ms(self, key_id: str) -> int:
        """> 0 while the public key id has used up its failure budget: an unknown secret for it is refused
        without a bcrypt for this long (cached keys are not asked)."""


def request_ip(request: web.Request) -> str:
    """The client's IP as the proxy sees it (``X-Forwarded-For`` only from ``server.trusted_proxies``)."""
    return client_ip(request.remote, request.headers.get("X-Forwarded-For"),
                     request.app[CONFIG].server.trusted_proxies)
