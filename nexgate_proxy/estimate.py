"""Worst-case token estimates made before a request goes upstream.

Used to hold credit and reserve tokens-per-minute. They read the parsed body in
memory and keep nothing of it. Text is counted at one token per three UTF-8
bytes (real tokenizers average about four): a hold that is a little too high is
released at settle; one that is too low lets a balance overrun.
"""

from __future__ import annotations

from typing import Any

BYTES_PER_TOKEN = 3
IMAGE_TOKENS = 1600
"""A high-detail image costs up to ~1,500 tokens at OpenAI and Anthropic; never count its base64 as text."""
PER_MESSAGE_OVERHEAD = 4
_OUTPUT_CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_MAX_DEPTH = 32


SMALL_BODY_BYTES = 16 * 1024
"""Below this, the whole body's size is the estimate: cheaper than walking it, and an over-estimate."""


def estimate_prompt_tokens(body: dict[str, Any], body_size: int | None = None) -> int:
    if body_size is not None and body_size <= SMALL_BODY_BYTES:
        return body_size // BYTES_PER_TOKEN + 8
    total = 0
    for key in ("messages", "input", "prompt", "system", "instructions", "tools", "functions"):
        value = body.get(key)
        if value is not None:
            total += _tokens(value, 0)
    if isinstance(body.get("messages"), list):
        total += PER_MESSAGE_OVERHEAD * len(body["messages"])
    return total + 8


TYPICAL_BYTES_PER_TOKEN = 4


def typical_input_tokens(body: dict[str, Any]) -> int:
    """A typical (not worst-case) prompt size: the answer of count_tokens for providers that cannot count."""
    total = sum(_tokens(body.get(key), 0, TYPICAL_BYTES_PER_TOKEN) for key in ("system", "messages", "tools")
                if body.get(key) is not None)
    if isinstance(body.get("messages"), list):
        total += PER_MESSAGE_OVERHEAD * len(body["messages"])
    return total


def _tokens(value: Any, depth: int, per_token: int = BYTES_PER_TOKEN) -> int:
    if depth > _MAX_DEPTH:
        return 0
    if isinstance(value, str):
        if value.startswith("data:") and ";base64," in value[:100]:
            return IMAGE_TOKENS
        return len(value.encode("utf-8", "surrogatepass")) // per_token + 1
    if isinstance(value, list):
        return sum(_tokens(v, depth + 1, per_token) for v in value)
    if isinstance(value, dict):
        if value.get("type") in ("image_url", "image", "input_image"):
            return IMAGE_TOKENS
        return sum(_tokens(v, depth + 1, per_token) for k, v in value.items() if k not in ("type", "role"))
    return 1 if value is not None else 0


def requested_output_cap(body: dict[str, Any]) -> int | None:
    """The client's own output cap, if it set a sane one."""
    for name in _OUTPUT_CAP_FIELDS:
        value = body.get(name)
        if type(value) is int and value > 0:
            n = body.get("n")
            choices = n if type(n) is int and 1 <= n <= 128 else 1
            return value * choices
    return None
