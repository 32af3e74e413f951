"""`type: anthropic`: Anthropic's Messages API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from .. import hookimpl
from .base import Provider

if TYPE_CHECKING:
    from ..context import RequestContext

DEFAULT_VERSION = "2023-06-01"


class AnthropicProvider(Provider):
    type_name = "anthropic"
    api_formats = frozenset({"anthropic"})

    def auth_headers(self) -> dict[str, str]:
        return {"x-api-key": self.config.api_key} if self.config.api_key else {}

    def extra_headers(self, ctx: RequestContext) -> Mapping[str, str]:
        # The client's SDK pins the API version it speaks; keep it, or use a safe default.
        if "anthropic-version" in ctx.headers:
            return {}
        return {"anthropic-version": DEFAULT_VERSION}


@hookimpl
def nexgate_register_providers() -> dict[str, type[Provider]]:
    return {AnthropicProvider.type_name: AnthropicProvider}
