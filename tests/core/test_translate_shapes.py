"""Translation never fails on a shape: any client body is translated or refused with a 400, any upstream
answer or stream event is translated or reported as a 502 / skipped, never a gateway bug (a 500)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nexgate_proxy.config import ModelRoute, Target
from nexgate_proxy.context import Usage
from nexgate_proxy.errors import GatewayError
from nexgate_proxy.translate import ChatViaMessages, MessagesViaChat
from nexgate_proxy.usage import StreamMeter

TARGET = Target(provider="p", model="m")
ROUTE = ModelRoute(alias="a", targets=(TARGET,))

# Keys both dialects use, so generated values reach deep into the translators rather than bouncing off.
KEYS = ["type", "role", "content", "text", "messages", "system", "tools", "tool_choice", "tool_calls", "function",
        "name", "arguments", "parameters", "input", "input_schema", "id", "tool_call_id", "tool_use_id",
        "image_url", "url", "source", "data", "media_type", "max_tokens", "stop", "stream", "response_format",
        "json_schema", "schema", "thinking", "budget_tokens", "reasoning_effort", "choices", "message", "delta",
        "finish_reason", "stop_reason", "usage", "index", "content_block", "partial_json", "thinking_blocks",
        "reasoning_content", "error", "signature", "is_error", "parallel_tool_calls", "metadata", "user"]
WORDS = st.sampled_from(["user", "assistant", "system", "tool", "developer", "text", "image_url", "image",
                         "tool_use", "tool_result", "function", "thinking", "text_delta", "input_json_delta",
                         "message_start", "content_block_start", "content_block_delta", "message_delta",
                         "json_schema", "json_object", "auto", "required", "any", "none", "low", "enabled",
                         "data:image/png;base64,AAAA", "{}", '{"a": 1}', "stop", "tool_calls", "end_turn"])
SCALARS = st.none() | st.booleans() | st.integers(-5, 5000) | st.floats(allow_nan=False) | WORDS | st.text(max_size=5)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS), inner, max_size=6), max_leaves=30)
OBJECTS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8)


def _body(obj: dict[str, Any], messages: Any) -> dict[str, Any]:
    return {**obj, "model": "a", "messages": messages}


@settings(max_examples=400, deadline=None)
@given(OBJECTS, VALUES)
def test_any_client_body_is_translated_or_refused_with_a_400(obj: dict[str, Any], messages: Any) -> None:
    for kind in (ChatViaMessages, MessagesViaChat):
        try:
            out = kind(_body(obj, messages)).request(TARGET, ROUTE)
        except GatewayError as exc:
            assert exc.status == 400
        else:
            assert isinstance(json.loads(out), dict)


@settings(max_examples=400, deadline=None)
@given(VALUES, st.integers(400, 599))
def test_any_upstream_answer_is_translated_or_a_502(answer: Any, status: int) -> None:
    raw = json.dumps(answer).encode()
    for kind in (ChatViaMessages, MessagesViaChat):
        translation = kind({"model": "a", "messages": []})
        try:
            assert isinstance(json.loads(translation.response(raw)), dict)
        except GatewayError as exc:
            assert exc.status == 502
        assert isinstance(json.loads(translation.error(status, raw)), dict)


@settings(max_examples=300, deadline=None)
@given(st.lists(OBJECTS, max_size=6))
def test_any_upstream_stream_event_is_translated_or_skipped(events: list[dict[str, Any]]) -> None:
    stream = b"".join(f"event: {e.get('type', 'x')}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    for kind in (ChatViaMessages, MessagesViaChat):
        meter = kind({"model": "a", "messages": [], "stream": True}).meter(StreamMeter(Usage()))
        out = meter.feed(stream) + meter.feed(b"data: [DONE]\n\n") + meter.finish()
        for line in out.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                json.loads(line[6:])
