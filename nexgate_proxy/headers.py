"""Which headers cross the proxy, in each direction."""

from __future__ import annotations

from typing import Mapping

# RFC 9110 7.6.1 hop-by-hop headers, plus ones that describe this connection only.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})

# Client credentials and identity must never reach a provider: NexGate adds the provider's own key.
_REQUEST_DROP = HOP_BY_HOP | frozenset({
    "host", "content-length", "content-encoding", "accept-encoding", "expect",
    "authorization", "x-api-key", "api-key", "cookie", "openai-organization", "openai-project",
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip",
    "x-request-id",  # NexGate sends its own request id upstream instead
})

# The provider's account details and cookies stay with NexGate; body framing is NexGate's own.
_RESPONSE_DROP = HOP_BY_HOP | frozenset({
    "content-length", "content-encoding", "set-cookie", "server", "date", "alt-svc",
    "openai-organization", "openai-project", "anthropic-organization-id", "via",
})
_RESPONSE_DROP_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "cf-", "x-nexgate-")

_CACHE_LIMIT = 512
"""Entries per verdict cache below: a client inventing header names still costs only the plain check."""


_NOTHING: frozenset[str] = frozenset()
_connection_names: dict[str, frozenset[str]] = {}


def _named_in_connection(headers: Mapping[str, str]) -> frozenset[str]:
    """The header names a ``Connection`` header lists beyond the hop-by-hop ones (usually none)."""
    value = headers.get("Connection")
    if not value:
        return _NOTHING
    names = _connection_names.get(value)
    if names is None:
        names = frozenset(h.strip().lower() for h in value.split(",")) - HOP_BY_HOP
        if len(_connection_names) < _CACHE_LIMIT:
            _connection_names[value] = names
    return names


# The verdict per header name as it was spelt, decided once: the names a client or an upstream
# sends are few and repeat on every request.
_request_keeps: dict[str, bool] = {}
_response_keeps: dict[str, bool] = {}


def _request_keep(name: str) -> bool:
    lower = name.lower()
    keep = not (lower in _REQUEST_DROP or lower.startswith("x-nexgate-"))
    if len(_request_keeps) < _CACHE_LIMIT:
        _request_keeps[name] = keep
    return keep


def _response_keep(name: str) -> bool:
    lower = name.lower()
    keep = not (lower in _RESPONSE_DROP or lower.startswith(_RESPONSE_DROP_PREFIXES))
    if len(_response_keeps) < _CACHE_LIMIT:
        _response_keeps[name] = keep
    return keep


def request_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    """Headers to forward upstream, from the client's."""
    extra = _named_in_connection(incoming)
    known = _request_keeps.get
    out: dict[str, str] = {}
    for name, value in incoming.items():
        keep = known(name)
        if keep is None:
            keep = _request_keep(name)
        if keep and not (extra and name.lower() in extra):
            out[name] = value
    return out


def response_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """Headers to relay to the client, from the upstream's."""
    extra = _named_in_connection(upstream)
    known = _response_keeps.get
    out: dict[str, str] = {}
    for name, value in upstream.items():
        keep = known(name)
        if keep is None:
            keep = _response_keep(name)
        if keep and not (extra and name.lower() in extra):
            out[name] = value
    return out
