"""The API operations NexGate proxies, and where each goes upstream."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    """Stable name used in records and metrics, e.g. "chat.completions"."""
    path: str
    """Path clients call on NexGate (also served without its ``/v1`` prefix, see ``bare_path``)."""
    api_format: str
    """"openai" or "anthropic": the dialect of the body, the errors and the stream."""
    upstream_path: str
    """Appended to the provider's base_url."""
    streams: bool
    include_usage_option: bool
    """Whether upstream takes ``stream_options.include_usage`` for this operation."""
    billed: bool = True
    """False: never charged credits, whatever the model's price (the call does no generation)."""

    @property
    def bare_path(self) -> str:
        """The path without ``/v1``: where SDKs pointed at the bare host URL send it."""
        return self.path.removeprefix("/v1")


COUNT_TOKENS = Endpoint("messages.count_tokens", "/v1/messages/count_tokens", "anthropic",
                        "/v1/messages/count_tokens", False, False, billed=False)
"""Forwarded to providers speaking Anthropic's API; every other provider answers an estimate."""

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("chat.completions", "/v1/chat/completions", "openai", "/chat/completions", True, True),
    Endpoint("completions", "/v1/completions", "openai", "/completions", True, True),
    Endpoint("embeddings", "/v1/embeddings", "openai", "/embeddings", False, False),
    Endpoint("responses", "/v1/responses", "openai", "/responses", True, False),
    Endpoint("moderations", "/v1/moderations", "openai", "/moderations", False, False, billed=False),
    Endpoint("messages", "/v1/messages", "anthropic", "/v1/messages", True, False),
    COUNT_TOKENS,
)
