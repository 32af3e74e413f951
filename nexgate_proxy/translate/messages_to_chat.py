"""An Anthropic Messages client (the Anthropic SDK, Claude Code) served by an OpenAI-compatible upstream.

Request: messages body -> chat body (usage always asked for in streams). Answer:
chat.completion -> message; chat.completion.chunk events -> message_start,
content_block_start/delta/stop (text_delta, input_json_delta, thinking_delta),
message_delta (stop_reason, usage) and message_stop, as they arrive.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from .common import (SHAPE_ERRORS, anthropic_error_type, client_body, count, events, json_or_none, loads_object, parse,
                     quote, refuse, skipped, sse, upstream_body, upstream_malformed)

if TYPE_CHECKING:
    from ..config import ModelRoute, Target
    from ..usage import StreamMeter

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}

_MAPPED = frozenset({"model", "messages", "system", "max_tokens", "temperature", "top_p", "stop_sequences",
                     "stream", "metadata", "tools", "tool_choice", "thinking", "service_tier"})


def reasoning_effort(budget: Any) -> str:
    """A thinking budget -> the nearest reasoning_effort."""
    if not isinstance(budget, int) or budget < 4096:
        return "low"
    return "medium" if budget < 16384 else "high"


class MessagesViaChat:
    upstream_endpoint = "chat.completions"
    __slots__ = ("body",)

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    # ---------------------------------------------------------- request

    @client_body
    def request(self, target: Target, route: ModelRoute) -> bytes:
        body = self.body
        for key in body:
            if key not in _MAPPED:
                refuse(key, "has no equivalent on this model's provider (OpenAI-compatible).")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            refuse("messages", "must be a non-empty array.")
        out: dict[str, Any] = {"model": target.model, "messages": _system(body.get("system")) + _messages(messages)}
        for key in ("max_tokens", "temperature", "top_p"):
            if body.get(key) is not None:
                out[key] = body[key]
        if body.get("stop_sequences"):
            out["stop"] = body["stop_sequences"]
        if body.get("stream"):
            out["stream"] = True
            out["stream_options"] = {"include_usage": True}
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
            out["user"] = metadata["user_id"]
        if body.get("service_tier") not in (None, "auto", "standard_only"):
            refuse("service_tier", "must be auto or standard_only on this model's provider.")
        tools = body.get("tools")
        if tools:
            out["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
        choice = body.get("tool_choice")
        if choice is not None:
            self._tool_choice(choice, out)
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
            out["reasoning_effort"] = reasoning_effort(thinking.get("budget_tokens", 8192))
        elif thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
            refuse("thinking", "must be enabled (with budget_tokens), adaptive or disabled.")
        return json.dumps(out).encode()

    @staticmethod
    def _tool_choice(choice: Any, out: dict[str, Any]) -> None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind or "")
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif mapped is not None:
            out["tool_choice"] = mapped
        else:
            refuse("tool_choice", "must be auto, any, tool or none.")
        if choice.get("disable_parallel_tool_use") and "tools" in out:
            out["parallel_tool_calls"] = False

    # ---------------------------------------------------------- answers

    @upstream_body
    def response(self, raw: bytes) -> bytes:
        data = json_or_none(raw)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not isinstance(choices[0], dict) or not isinstance(choices[0].get("message"), dict):
            raise upstream_malformed()
        message = choices[0]["message"]
        content: list[dict[str, Any]] = []
        if message.get("reasoning_content"):
            content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
        text = message.get("content") or message.get("refusal")
        if text:
            content.append({"type": "text", "text": text})
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                            "input": loads_object(fn.get("arguments"))})
        out = {"id": data.get("id"), "type": "message", "role": "assistant", "model": data.get("model"),
               "content": content, "stop_reason": STOP_REASONS.get(choices[0].get("finish_reason"), "end_turn"),
               "stop_sequence": None, "usage": messages_usage(data.get("usage"))}
        return json.dumps(out).encode()

    @upstream_body
    def error(self, status: int, raw: bytes) -> bytes:
        data = json_or_none(raw)
        err = data.get("error") if isinstance(data, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        return json.dumps({"type": "error", "error": {
            "type": anthropic_error_type(status),
            "message": message or f"The upstream provider answered HTTP {status}."}}).encode()

    def meter(self, meter: StreamMeter) -> EventsFromChunks:
        return EventsFromChunks(meter)


def messages_usage(u: Any) -> dict[str, Any]:
    """OpenAI usage (prompt includes cached tokens) -> Anthropic usage (input excludes cache reads)."""
    u = u if isinstance(u, dict) else {}
    details = u.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    cached = count(details.get("cached_tokens"))
    written = count(details.get("cache_write_tokens"))
    return {"input_tokens": max(count(u.get("prompt_tokens")) - cached - written, 0),
            "output_tokens": count(u.get("completion_tokens")),
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": written}


class EventsFromChunks:
    """chat.completion.chunk events -> Anthropic SSE events, as they arrive.

    Wraps the stream meter (usage from the upstream's own chunks; ``[DONE]`` held until
    settle). OpenAI sends the finish reason, then the usage chunk, then ``[DONE]``;
    Anthropic wants both in message_delta, so message_delta goes out with message_stop.
    """

    __slots__ = ("_meter", "_started", "_open", "_open_kind", "_next", "_tools", "_stop", "_usage", "_done")

    def __init__(self, meter: StreamMeter) -> None:
        self._meter = meter
        self._started = False
        self._open: int | None = None
        self._open_kind = ""
        self._next = 0
        self._tools: dict[int, int] = {}
        """tool call index -> content block index"""
        self._stop = "end_turn"
        self._usage: Any = None
        self._done = False

    def feed(self, chunk: bytes) -> bytes:
        return self._translate(self._meter.feed(chunk))

    def finish(self) -> bytes:
        out = self._translate(self._meter.finish())
        if self._started and not self._done:  # the upstream ended without [DONE]: end the message anyway
            out += self._end()
        return out

    def _translate(self, data: bytes) -> bytes:
        if not data:
            return data
        out: list[bytes] = []
        for payload in events(data):
            if self._open_kind == "text" and '"usage"' not in payload:
                text = _CONTENT_DELTA.search(payload)
                if text is not None:  # most chunks: the JSON string literal goes out as it came
                    out.append(_TEXT_DELTA % (self._open, text.group(1).encode()))
                    continue
            if payload.startswith("[DONE]"):
                if self._started and not self._done:
                    out.append(self._end())
                continue
            chunk = parse(payload)
            if isinstance(chunk, dict):
                try:
                    self._chunk(chunk, out)
                except SHAPE_ERRORS as exc:
                    skipped(exc)
        return b"".join(out)

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if isinstance(chunk.get("error"), dict):
            err = chunk["error"]
            out.append(sse("error", {"type": "error", "error": {"type": "api_error", "message": err.get("message")}}))
            return
        if not self._started:
            self._started = True
            out.append(sse("message_start", {"type": "message_start", "message": {
                "id": chunk.get("id"), "type": "message", "role": "assistant", "model": chunk.get("model"),
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}))
            out.append(sse("ping", {"type": "ping"}))
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
                out.append(self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
            text = delta.get("content")
            if text and isinstance(text, str):
                self._block("text", {"type": "text", "text": ""}, out)
                out.append(_TEXT_DELTA % (self._open, quote(text).encode()))
            for call in delta.get("tool_calls") or ():
                index = call.get("index", 0)
                fn = call.get("function") or {}
                if index not in self._tools:
                    self._close(out)
                    self._tools[index] = self._next
                    self._block(f"tool{index}", {"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                                                 "input": {}}, out)
                if fn.get("arguments"):
                    out.append(self._delta({"type": "input_json_delta", "partial_json": fn["arguments"]},
                                           self._tools[index]))
            if choice.get("finish_reason"):
                self._stop = STOP_REASONS.get(choice["finish_reason"], "end_turn")
                self._close(out)

    def _block(self, kind: str, start: dict[str, Any], out: list[bytes]) -> None:
        if self._open is not None and self._open_kind == kind:
            return
        self._close(out)
        self._open, self._open_kind = self._next, kind
        self._next += 1
        out.append(sse("content_block_start", {"type": "content_block_start", "index": self._open,
                                               "content_block": start}))

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> bytes:
        return sse("content_block_delta", {"type": "content_block_delta",
                                           "index": self._open if index is None else index, "delta": delta})

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(sse("content_block_stop", {"type": "content_block_stop", "index": self._open}))
            self._open = None

    def _end(self) -> bytes:
        self._done = True
        out: list[bytes] = []
        self._close(out)
        out.append(sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": self._stop, "stop_sequence": None},
                                         "usage": messages_usage(self._usage)}))
        out.append(sse("message_stop", {"type": "message_stop"}))
        return b"".join(out)


_CONTENT_DELTA = re.compile(r'"choices": ?\[\{"index": ?0, ?"delta": ?\{"content": ?("[^"\\]*(?:\\.[^"\\]*)*")\}, ?'
                            r'(?:"logprobs": ?null, ?)?"finish_reason": ?null\}\]')
_TEXT_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
               b'"delta":{"type":"text_delta","text":%s}}\n\n')


# ------------------------------------------------------------------ request parts

def _system(system: Any) -> list[dict[str, Any]]:
    if not system:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if not isinstance(system, list):
        refuse("system", "must be a string or an array of text blocks.")
    return [{"role": "system", "content": "\n\n".join(_texts(system, "system"))}]


def _texts(blocks: list[Any], where: str) -> list[str]:
    texts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            refuse(f"{where}[{j}]", "must be a text block on this model's provider (OpenAI-compatible).")
        texts.append(block.get("text", ""))
    return texts


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            refuse(f"messages[{i}]", "must be an object.")
        role, content = m.get("role"), m.get("content")
        where = f"messages[{i}].content"
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            refuse(where, "must be a string or an array of content blocks.")
        if role == "user":
            out += _user(content, where)
        elif role == "assistant":
            out.append(_assistant(content, where))
        else:
            refuse(f"messages[{i}].role", "must be user or assistant.")
    return out


def _user(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    # Tool results become `tool` messages, which OpenAI wants right after the assistant's calls.
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _source_url(block.get("source"), f"{where}[{j}]")}})
        elif kind == "document" and (block.get("source") or {}).get("type") == "base64":
            source = block["source"]
            parts.append({"type": "file", "file": {"filename": block.get("title") or "document.pdf",
                                                   "file_data": f"data:{source.get('media_type')};base64,"
                                                                f"{source.get('data')}"}})
        elif kind == "tool_result":
            results.append(_tool_result(block, f"{where}[{j}]"))
        else:
            refuse(f"{where}[{j}]", f"of type {kind!r} cannot be sent to this model's provider (OpenAI-compatible).")
    out = results
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _source_url(source: Any, where: str) -> str:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if kind == "url":
        return source.get("url")
    refuse(f"{where}.source", "must be a base64 or url image source on this model's provider.")


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    content = block.get("content")
    if isinstance(content, list):
        content = "\n".join(_texts(content, f"{where}.content"))
    text = content if isinstance(content, str) else ""
    if block.get("is_error"):
        text = f"Error: {text}"  # OpenAI has no error flag on a tool result: say it in the content
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}


def _assistant(blocks: list[Any], where: str) -> dict[str, Any]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input", {}))}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier reasoning is not sent back to OpenAI-compatible models (they do not take it)
        else:
            refuse(f"{where}[{j}]", f"of type {kind!r} cannot be sent to this model's provider (OpenAI-compatible).")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
        refuse(f"tools[{i}]", "must be a client tool (name, input_schema); server tools run only on Anthropic.")
    fn: dict[str, Any] = {"name": tool.get("name"), "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}
