"""The API operations NexGate proxies, and where each goes upstream."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    """Stable name used in records and metrics, e.g. "chat.completions"."""
    path: str
    """Path clients call on NexGate."""
    api_format: str
    """"openai" or "anthropic": the dialect of the body, the errors and the stream."""
    upstream_path: str
    """Appended to the provider's base_url."""
    streams: bool
    include_usage_option: bool
    """Whether upstream takes ``stream_options.include_usage`` for this operation."""


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("chat.completions", "/v1/chat/completions", "openai", "/chat/completions", True, True),
    Endpoint("completions", "/v1/completions", "openai", "/completions", True, True),
    Endpoint("embeddings", "/v1/embeddings", "openai", "/embeddings", False, False),
    Endpoint("responses", "/v1/responses", "openai", "/responses", True, False),
    Endpoint("messages", "/v1/messages", "anthropic", "/v1/messages", True, False),
)
