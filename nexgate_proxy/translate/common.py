"""Pieces both translation directions share: SSE framing, refusals, data URLs, error shapes."""

from __future__ import annotations

import functools
import json
import logging
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Callable, NoReturn, TypeVar

from ..errors import GatewayError

log = logging.getLogger("nexgate.translate")

F = TypeVar("F", bound=Callable[..., Any])

# What walking a JSON value of an unexpected shape raises (a string where an object was due, ...).
SHAPE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ValueError)

DEFAULT_MAX_TOKENS = 4096
"""Anthropic requires ``max_tokens``: used when the client set none and the model has no ``max_output_tokens``."""

_raw_decode = json.JSONDecoder().raw_decode
quote = encode_basestring_ascii
"""A str as a JSON string literal (the C encoder json.dumps uses), for the per-delta templates."""


def events(data: bytes) -> list[str]:
    """The data of each SSE event in ``data`` (whole events, as the stream meter hands them on)."""
    text = data.decode("utf-8", "replace")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    out = []
    for raw in text.split("\n\n"):
        # The usual event has one data line, last (after its `event:` line); JSON never holds a raw newline.
        at = 5 if raw.startswith("data:") else raw.find("\ndata:") + 6
        if at == 5 or at > 5:
            if raw.find("\n", at) < 0:
                out.append(raw[at + 1:] if raw.startswith(" ", at) else raw[at:])
                continue
            lines = [line[5:].lstrip(" ") for line in raw.split("\n") if line.startswith("data:")]
            out.append("\n".join(lines))
    return out


def parse(payload: str) -> Any:
    try:
        return _raw_decode(payload)[0]
    except ValueError:
        return None


def sse(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()


def sse_data(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def refuse(param: str, why: str) -> NoReturn:
    """A 400 naming what cannot cross to the other dialect (the proxy shapes it in the client's dialect)."""
    raise GatewayError(400, f"`{param}` {why}", code="unsupported_parameter", param=param)


def parse_data_url(url: str, param: str) -> tuple[str, str]:
    """``data:<media type>;base64,<data>`` -> (media type, base64 data)."""
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64"):
        refuse(param, "must be an http(s) URL or a base64 data URL (data:<type>;base64,...).")
    return head[5:-7], data


def loads_object(text: Any) -> dict[str, Any]:
    """Tool call arguments (a JSON string in OpenAI's dialect) as the object Anthropic's dialect carries."""
    if isinstance(text, dict):
        return text
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"_raw_arguments": text}  # a model's malformed JSON is kept, not dropped
    return value if isinstance(value, dict) else {"_raw_arguments": text}


def count(value: Any) -> int:
    """A token count from an upstream's usage (untrusted JSON): anything but a plain count is 0."""
    return value if type(value) is int and value >= 0 else 0


def json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def upstream_malformed() -> GatewayError:
    return GatewayError(502, "The upstream provider sent an answer the gateway could not translate.",
                        code="upstream_malformed")


# Anthropic's error `type` by status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                         403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                         429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error"}


def anthropic_error_type(status: int) -> str:
    return ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def _shape_errors_as(error: Callable[[], GatewayError]) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except GatewayError:
                raise
            except SHAPE_ERRORS:
                raise error() from None
        return guarded  # type: ignore[return-value]
    return decorate


client_body = _shape_errors_as(lambda: GatewayError(
    400, "A field of the request has a type or shape this model's provider cannot take.", code="invalid_request"))
"""A client's body of an unexpected shape is the client's 400, never the gateway's 500."""
upstream_body = _shape_errors_as(upstream_malformed)
"""An upstream answer of an unexpected shape is a 502, never a 500."""


def skipped(exc: Exception) -> None:
    # The type only: the event is model output.
    log.warning("skipped a stream event of an unexpected shape from the upstream (%s)", type(exc).__name__)
