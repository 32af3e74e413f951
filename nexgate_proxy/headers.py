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


def _named_in_connection(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("Connection")
    return {h.strip().lower() for h in value.split(",")} if value else set()


def request_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    """Headers to forward upstream, from the client's."""
    extra = _named_in_connection(incoming)
    out: dict[str, str] = {}
    for name, value in incoming.items():
        lower = name.lower()
        if lower in _REQUEST_DROP or lower in extra or lower.startswith("x-nexgate-"):
            continue
        out[name] = value
    return out


def response_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """Headers to relay to the client, from the upstream's."""
    extra = _named_in_connection(upstream)
    out: dict[str, str] = {}
    for name, value in upstream.items():
        lower = name.lower()
        if lower in _RESPONSE_DROP or lower in extra or lower.startswith(_RESPONSE_DROP_PREFIXES):
            continue
        out[name] = value
    return out
