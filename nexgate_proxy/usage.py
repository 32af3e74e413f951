"""Token usage from upstream answers: JSON bodies and SSE streams.

The stream meter sees every relayed chunk. It only parses the few events that
carry usage (found by a substring test), so relaying stays a byte copy.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .context import Usage

_EVENT_SPLIT = re.compile(rb"(\r?\n\r?\n)")
_USAGE_MARK = b'"usage"'
# Streams repeat "usage":null in every chunk once usage is requested; only an object is worth parsing.
_USAGE_OBJECT = (b'"usage":{', b'"usage": {')


def _int(value: Any) -> int | None:
    # Upstream JSON is untrusted: only plain non-negative integers count.
    return value if type(value) is int and value >= 0 else None


def _detail(u: dict[str, Any], details: str, name: str) -> int | None:
    d = u.get(details)
    return _int(d.get(name)) if isinstance(d, dict) else None


def apply_usage(usage: Usage, u: Any) -> bool:
    """Merge one usage object (OpenAI, Responses or Anthropic naming) into ``usage``.

    ``Usage`` counts as OpenAI does; the dialects differ in what their totals include:
    - OpenAI chat/completions: ``prompt_tokens`` INCLUDES ``prompt_tokens_details.cached_tokens``,
      ``cache_write_tokens`` (OpenRouter and NexGate's own translation report them) and
      ``audio_tokens``; ``completion_tokens`` includes ``completion_tokens_details.audio_tokens``.
    - OpenAI Responses: ``input_tokens`` includes ``input_tokens_details.cached_tokens``.
    - Anthropic: ``input_tokens`` EXCLUDES ``cache_read_input_tokens`` and
      ``cache_creation_input_tokens``: the prompt is their sum. The writes split into
      ``cache_creation.ephemeral_5m_input_tokens`` and ``ephemeral_1h_input_tokens``.
    A class is only set when the object names it (an Anthropic stream's message_delta carries
    just output_tokens, after message_start carried the input side).
    """
    if not isinstance(u, dict):
        return False
    found = False
    written = written_1h = audio_in = audio_out = None
    if "prompt_tokens" in u or "completion_tokens" in u:  # OpenAI chat, completions, embeddings
        prompt, completion = _int(u.get("prompt_tokens")), _int(u.get("completion_tokens"))
        cached = _detail(u, "prompt_tokens_details", "cached_tokens")
        written = _detail(u, "prompt_tokens_details", "cache_write_tokens")
        audio_in = _detail(u, "prompt_tokens_details", "audio_tokens")
        audio_out = _detail(u, "completion_tokens_details", "audio_tokens")
    elif "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u or (
        "input_tokens" in u and "input_tokens_details" not in u and "total_tokens" not in u
    ):  # Anthropic: input_tokens excludes cache reads and writes
        base = _int(u.get("input_tokens"))
        cached = _int(u.get("cache_read_input_tokens"))
        written = _int(u.get("cache_creation_input_tokens"))
        written_1h = _detail(u, "cache_creation", "ephemeral_1h_input_tokens")
        prompt = None if base is None else base + (cached or 0) + (written or 0)
        completion = _int(u.get("output_tokens"))
    else:  # OpenAI Responses: input_tokens includes cached ones
        prompt, completion = _int(u.get("input_tokens")), _int(u.get("output_tokens"))
        cached = _detail(u, "input_tokens_details", "cached_tokens")
    if prompt is not None:
        usage.prompt_tokens = prompt
        found = True
    if completion is not None:
        usage.completion_tokens = completion
        found = True
    if cached is not None:
        usage.cached_tokens = cached
    if written is not None:
        usage.cache_write_tokens = written
    if written_1h is not None:
        usage.cache_write_1h_tokens = written_1h
    if audio_in is not None:
        usage.audio_input_tokens = audio_in
    if audio_out is not None:
        usage.audio_output_tokens = audio_out
    if found:
        usage.reported = True
    return found


_DECODER = json.JSONDecoder()


def usage_from_body(usage: Usage, body: bytes) -> int:
    """Read usage from a non-streamed JSON answer (all formats keep it at top-level "usage").

    Answers put usage last; decoding just that object from the last ``"usage":`` avoids
    parsing the whole answer (embeddings can be megabytes). Falls back to a full parse.
    Returns where the usage object's closing brace is, for ``with_cost``: -1 when unknown,
    -2 when the object has a ``cost`` of its own (the provider's price: ``add_cost`` replaces it).
    """
    at = body.rfind(_USAGE_MARK)
    if at < 0:
        return -1
    try:
        tail = body[at + len(_USAGE_MARK):]
        text = tail.decode()
        start = text.index(":") + 1
        while text[start] in " \t\r\n":
            start += 1
        value, end = _DECODER.raw_decode(text, start)
        if isinstance(value, dict) and apply_usage(usage, value):
            if "cost" in value:
                return -2
            # The tail is ASCII in practice (keys and numbers): then characters are bytes.
            offset = end if len(text) == len(tail) else len(text[:end].encode())
            return at + len(_USAGE_MARK) + offset - 1
    except (ValueError, IndexError, UnicodeDecodeError):
        pass
    try:
        data = json.loads(body)
    except ValueError:
        return -1
    if isinstance(data, dict):
        apply_usage(usage, data.get("usage"))
    return -1


def with_cost(body: bytes, closing: int, cost: str) -> bytes:
    """``body`` with ``,"cost":<cost>`` before the usage object's closing brace (``usage_from_body``)."""
    return body[:closing] + b',"cost":' + cost.encode() + body[closing:]


def add_cost(body: bytes, cost: str) -> bytes:
    """``body`` with ``"cost": <cost>`` (USD, a JSON number) in its last usage object, OpenRouter's convention.

    Only that object's bytes change: the key is appended before its closing brace (an upstream's own
    ``cost``, the operator's price, is replaced). Unchanged when there is no usage object.
    """
    at = body.rfind(_USAGE_MARK)
    if at < 0:
        return body
    start = at + len(_USAGE_MARK)
    try:
        text = body[start:].decode()
        colon = text.index(":") + 1
        value_at = colon
        while text[value_at] in " \t\r\n":
            value_at += 1
        value, end = _DECODER.raw_decode(text, value_at)
    except (ValueError, IndexError, UnicodeDecodeError):
        return body
    if not isinstance(value, dict):
        return body
    first = start + len(text[:value_at].encode())
    last = start + len(text[:end].encode())
    if "cost" in value:
        value.pop("cost")
        value["cost"] = cost
        rendered = json.dumps(value).replace(f'"cost": "{cost}"', f'"cost": {cost}').encode()
        return body[:first] + rendered + body[last:]
    closing = last - 1  # the object's "}"
    return body[:closing] + (b',"cost":' if value else b'"cost":') + cost.encode() + body[closing:]


# Keys holding generated text in every dialect's answer: chat content, tool-call arguments,
# reasoning; completions' and Responses' text; Anthropic's text and thinking.
_TEXT_KEYS = frozenset({"content", "text", "arguments", "reasoning_content", "reasoning", "refusal", "thinking"})


def estimate_output_tokens(body: bytes) -> int:
    """Output tokens of a non-streamed answer that reported no usage: about 4 characters a token.

    Counts the generated text (message content, tool-call arguments and inputs, reasoning),
    not ids or model names. Runs only when the answer has no usage; the text stays in memory.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return 0
    chars = _text_chars(data)
    return -(-chars // 4)


def _text_chars(value: Any) -> int:
    chars = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, v in item.items():
                if isinstance(v, str):
                    if key in _TEXT_KEYS:
                        chars += len(v)
                elif key == "input" and isinstance(v, dict):  # an Anthropic tool_use's arguments
                    chars += len(json.dumps(v))
                elif isinstance(v, (dict, list)):
                    stack.append(v)
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, (dict, list)))
    return chars


# The event that ends a stream in each dialect; it is held back until the request is settled.
_TERMINAL_MARKS = (b"[DONE]", b"message_stop", b"response.completed", b"response.incomplete", b"response.failed")


class StreamMeter:
    """Splits a relayed SSE stream into whole events and reads usage from them.

    ``feed`` returns the bytes to send on: whole events only, so a client never
    waits on a half event and a dropped event never leaves a fragment behind.
    The stream's final event (``[DONE]``, ``message_stop``, ``response.completed``)
    is held back and returned by ``finish``, so the gateway can settle before
    the client sees the end. When ``strip_usage_chunk`` is set (NexGate asked
    upstream for usage the client did not ask for), the usage-only chunk is
    removed from the output. When ``hold_usage_chunk`` is set (the client asked for
    usage), that chunk is held back too and ``finish`` returns it before the final
    event, so the gateway can add the charged cost to it (``add_cost``).
    """

    __slots__ = ("usage", "strip_usage_chunk", "hold_usage_chunk", "_tail", "_held", "_usage_chunk")

    def __init__(self, usage: Usage, strip_usage_chunk: bool = False, hold_usage_chunk: bool = False) -> None:
        self.usage = usage
        self.strip_usage_chunk = strip_usage_chunk
        self.hold_usage_chunk = hold_usage_chunk
        self._tail = b""
        self._held = b""
        self._usage_chunk = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._tail + chunk if self._tail else chunk
        end = _last_event_end(data)
        if end < 0:
            self._tail = data
            return b""
        whole, self._tail = data[:end], data[end:]
        out = self._scan(whole)
        if self._held:  # something came after the final event: it was not final after all
            out, self._held = self._held + out, b""
        return self._hold_terminal(out)

    def finish(self) -> bytes:
        """The held final event and whatever is left when the upstream ended."""
        rest, self._tail = self._tail, b""
        rest = self._scan(rest) if rest.strip() else rest
        held, self._held = self._held, b""
        usage_chunk, self._usage_chunk = self._usage_chunk, b""
        return usage_chunk + held + rest

    def _hold_terminal(self, out: bytes) -> bytes:
        if not out:
            return out
        start = _last_event_start(out)
        last = out[start:]
        if any(mark in last for mark in _TERMINAL_MARKS):
            self._held = last
            return out[:start]
        return out

    def _scan(self, whole: bytes) -> bytes:
        self.usage.stream_events += whole.count(b"data:")
        at = _find_usage_object(whole, 0)
        # Only the events holding a usage object are parsed (usually one per stream): find each
        # one's bounds around its match instead of splitting every event out.
        while at >= 0:
            start = _event_start(whole, at)
            separator = _EVENT_SPLIT.search(whole, at)
            end, after = (separator.start(), separator.end()) if separator else (len(whole), len(whole))
            if self._read_event(whole[start:end]):
                if self.hold_usage_chunk:
                    self._usage_chunk += whole[start:after]
                whole = whole[:start] + whole[after:]
                at = _find_usage_object(whole, start)
            else:
                at = _find_usage_object(whole, after)
        return whole

    def _read_event(self, event: bytes) -> bool:
        """Apply the event's usage; True when the event should be dropped."""
        payload = b"\n".join(
            line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
        )
        try:
            data = json.loads(payload)
        except ValueError:
            return False
        if not isinstance(data, dict):
            return False
        for holder in (data, data.get("message"), data.get("response")):
            if isinstance(holder, dict) and apply_usage(self.usage, holder.get("usage")):
                break
        return (self.strip_usage_chunk or self.hold_usage_chunk) and data.get("choices") == []


def _find_usage_object(data: bytes, start: int) -> int:
    first = data.find(_USAGE_OBJECT[0], start)
    second = data.find(_USAGE_OBJECT[1], start)
    return second if first < 0 else first if second < 0 else min(first, second)


_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\n\r\n", b"\r\n\n")  # what _EVENT_SPLIT matches


def _event_start(data: bytes, at: int) -> int:
    """Where the event holding position ``at`` begins: just after the last blank line before it."""
    start = 0
    for sep in _SEPARATORS:
        found = data.rfind(sep, 0, at)
        if found >= 0 and found + len(sep) > start:
            start = found + len(sep)
    return start


def _last_event_start(data: bytes) -> int:
    """Where the last whole event of ``data`` (which ends with a blank line) begins."""
    body = data.rstrip(b"\r\n")
    lf = body.rfind(b"\n\n")
    crlf = body.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _last_event_end(data: bytes) -> int:
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)
