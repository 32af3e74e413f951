"""OpenAI <-> Anthropic translation: any client to any model.

A translation exists for a client endpoint whose dialect the target's provider
does not speak: Chat Completions to an Anthropic provider, Messages to an
OpenAI-compatible one. It runs in memory only (nothing translated is logged or
kept). The proxy asks ``translation_for`` per attempt, so a fallback can cross
dialects; the same-dialect path never reaches this package.

A translation object offers ``request(target, route) -> bytes`` (refusing what
cannot cross with a 400 naming the parameter), ``response(bytes)``,
``error(status, bytes)`` and ``meter(StreamMeter)``, a stream translator
with the meter's ``feed``/``finish`` interface.
"""

from __future__ import annotations

from typing import Any, Collection

from .chat_to_messages import ChatViaMessages, ChunksFromEvents
from .common import DEFAULT_MAX_TOKENS
from .messages_to_chat import EventsFromChunks, MessagesViaChat

Translation = ChatViaMessages | MessagesViaChat
StreamTranslator = ChunksFromEvents | EventsFromChunks

# (client endpoint, the dialect the provider speaks) -> translation
_TRANSLATIONS: dict[tuple[str, str], type[Translation]] = {
    ("chat.completions", "anthropic"): ChatViaMessages,
    ("messages", "openai"): MessagesViaChat,
}


def translatable(endpoint: str, provider_formats: Collection[str]) -> bool:
    """Whether a provider speaking ``provider_formats`` can serve ``endpoint`` through a translation."""
    return any((endpoint, f) in _TRANSLATIONS for f in provider_formats)


def translated_endpoint(endpoint: str, provider_formats: Collection[str]) -> str | None:
    """The upstream operation a translation sends ``endpoint`` to (None: there is no translation)."""
    for f in provider_formats:
        kind = _TRANSLATIONS.get((endpoint, f))
        if kind is not None:
            return kind.upstream_endpoint
    return None


def translation_for(endpoint: str, provider_formats: Collection[str],
                    body: dict[str, Any]) -> Translation | None:
    for f in provider_formats:
        kind = _TRANSLATIONS.get((endpoint, f))
        if kind is not None:
            return kind(body)
    return None


__all__ = ["DEFAULT_MAX_TOKENS", "ChatViaMessages", "MessagesViaChat", "StreamTranslator", "Translation",
           "translatable", "translated_endpoint", "translation_for"]
