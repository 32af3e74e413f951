"""`type: openai`: OpenAI and every OpenAI-compatible API (DeepSeek, xAI, vLLM, ...)."""

from __future__ import annotations

from .. import hookimpl
from .base import Provider


class OpenAIProvider(Provider):
    type_name = "openai"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}


@hookimpl
def nexgate_register_providers() -> dict[str, type[Provider]]:
    return {OpenAIProvider.type_name: OpenAIProvider}
