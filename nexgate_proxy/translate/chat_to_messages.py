"""An OpenAI Chat Completions client served by an Anthropic Messages upstream.

Request: chat body -> messages body. Answer: message -> chat.completion; the
SSE events (message_start, content_block_*, message_delta, message_stop, ping,
error) -> chat.completion.chunk events, one by one as they arrive.
JSON mode and structured output ride on one forced tool whose input is the
JSON answer (Anthropic's documented way to get JSON); its input comes back as
the message content. Thinking comes back as ``reasoning_content`` plus
``thinking_blocks`` (their signatures, LiteLLM's convention): an assistant
message sent back with them keeps Claude's thinking across tool calls.
"""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING, Any

from .common import (DEFAULT_MAX_TOKENS, SHAPE_ERRORS, client_body, count, events, json_or_none, parse, parse_data_url,
                     quote, refuse, skipped, sse_data, upstream_body, upstream_malformed)

if TYPE_CHECKING:
    from ..config import ModelRoute, Target
    from ..usage import StreamMeter

FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                  "pause_turn": "stop", "refusal": "content_filter", "model_context_window_exceeded": "length"}

# reasoning_effort -> thinking budget (Anthropic's minimum budget is 1024 tokens).
THINKING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576}

JSON_TOOL = "json_response"

# Accepted only at their default value: anything else has no Anthropic equivalent.
_DEFAULT_ONLY = {"n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0),
                 "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "store": (None, False),
                 "service_tier": (None, "auto", "default"), "modalities": (None, ["text"]),
                 "logit_bias": (None, {}), "seed": (None,)}
_MAPPED = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                     "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls", "user",
                     "response_format", "reasoning_effort"})


class ChatViaMessages:
    """One request's translation; ``request`` runs per attempt (each target has its own model name)."""

    upstream_endpoint = "messages"
    __slots__ = ("body", "json_mode", "include_usage")

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.json_mode = False
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True

    # ---------------------------------------------------------- request

    @client_body
    def request(self, target: Target, route: ModelRoute) -> bytes:
        body = self.body
        for key, value in body.items():
            if key in _MAPPED:
                continue
            allowed = _DEFAULT_ONLY.get(key)
            if allowed is None:
                refuse(key, "has no equivalent on this model's provider (Anthropic).")
            if value not in allowed:
                default = "" if allowed[-1] is None else f" or send {json.dumps(allowed[-1])}"
                refuse(key, f"is not supported by this model's provider (Anthropic); omit it{default}.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            refuse("messages", "must be a non-empty array.")
        system, turns = _messages(messages)
        out: dict[str, Any] = {"model": target.model, "messages": turns}
        if system:
            out["system"] = system
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        out["max_tokens"] = max_tokens if max_tokens is not None else (route.max_output_tokens or DEFAULT_MAX_TOKENS)
        for key in ("temperature", "top_p"):
            if body.get(key) is not None:
                out[key] = body[key]
        stop = body.get("stop")
        if stop is not None:
            out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
        if body.get("stream"):
            out["stream"] = True
        if isinstance(body.get("user"), str):
            out["metadata"] = {"user_id": body["user"]}
        tools = body.get("tools")
        if tools:
            out["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None and (tools or choice["type"] == "none"):
            out["tool_choice"] = choice
        effort = body.get("reasoning_effort")
        if effort is not None and effort != "none":
            budget = THINKING_BUDGETS.get(effort)
            if budget is None:
                refuse("reasoning_effort", f"must be one of {', '.join(THINKING_BUDGETS)} or none.")
            budget = min(budget, out["max_tokens"] - 1)
            if budget < 1024:
                refuse("reasoning_effort", "needs max_completion_tokens above 1024 on this model (Anthropic's "
                       "smallest thinking budget).")
            out["thinking"] = {"type": "enabled", "budget_tokens": budget}
        self._response_format(body.get("response_format"), out)
        return json.dumps(out).encode()

    def _response_format(self, fmt: Any, out: dict[str, Any]) -> None:
        if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
            return
        if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
            refuse("response_format", "must be text, json_object or json_schema.")
        if "tools" in out:
            refuse("response_format", "cannot be combined with tools on this model's provider (Anthropic).")
        if "thinking" in out:
            refuse("response_format", "cannot be combined with reasoning_effort on this model's provider (Anthropic).")
        schema: dict[str, Any] = {"type": "object"}
        description = "Respond with your whole answer as this tool's input, a JSON object."
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                refuse("response_format.json_schema.schema", "must be a JSON schema object.")
            schema = spec["schema"]
            description = spec.get("description") or description
        out["tools"] = [{"name": JSON_TOOL, "description": description, "input_schema": schema}]
        out["tool_choice"] = {"type": "tool", "name": JSON_TOOL}
        self.json_mode = True

    # ---------------------------------------------------------- answers

    @upstream_body
    def response(self, raw: bytes) -> bytes:
        msg = json_or_none(raw)
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), list):
            raise upstream_malformed()
        text: list[str] = []
        reasoning: list[str] = []
        signed: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for block in msg["content"]:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                text.append(block.get("text", ""))
            elif kind == "thinking":
                reasoning.append(block.get("thinking", ""))
                signed.append({"type": "thinking", "signature": block.get("signature", "")})
            elif kind == "redacted_thinking":
                signed.append({"type": "redacted_thinking", "data": block.get("data", "")})
            elif kind == "tool_use":
                if self.json_mode:
                    text.append(json.dumps(block.get("input")))
                else:
                    calls.append({"id": block.get("id"), "type": "function",
                                  "function": {"name": block.get("name"),
                                               "arguments": json.dumps(block.get("input", {}))}})
        message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None,
                                   "refusal": None}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if signed:
            message["thinking_blocks"] = signed
        if calls:
            message["tool_calls"] = calls
        out = {"id": msg.get("id"), "object": "chat.completion", "created": int(time.time()),
               "model": msg.get("model"),
               "choices": [{"index": 0, "message": message, "logprobs": None,
                            "finish_reason": self._finish(msg.get("stop_reason"))}],
               "usage": chat_usage(msg.get("usage"))}
        return json.dumps(out).encode()

    def _finish(self, stop_reason: Any) -> str | None:
        if stop_reason is None:
            return None
        if self.json_mode and stop_reason == "tool_use":
            return "stop"
        return FINISH_REASONS.get(stop_reason, "stop")

    @upstream_body
    def error(self, status: int, raw: bytes) -> bytes:
        data = json_or_none(raw)
        err = data.get("error") if isinstance(data, dict) else None
        if not isinstance(err, dict):
            err = {"type": "api_error", "message": f"The upstream provider answered HTTP {status}."}
        return json.dumps({"error": {"message": err.get("message"), "type": err.get("type"),
                                     "param": None, "code": None}}).encode()

    def meter(self, meter: StreamMeter) -> ChunksFromEvents:
        return ChunksFromEvents(meter, self)


def chat_usage(u: Any) -> dict[str, Any]:
    """Anthropic usage (input excludes cache reads and writes) -> OpenAI usage (prompt includes them)."""
    u = u if isinstance(u, dict) else {}
    read = count(u.get("cache_read_input_tokens"))
    write = count(u.get("cache_creation_input_tokens"))
    prompt = count(u.get("input_tokens")) + read + write
    completion = count(u.get("output_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write}}


class ChunksFromEvents:
    """Anthropic SSE events -> chat.completion.chunk events, one event at a time (nothing is buffered).

    Wraps the stream meter: the meter reads usage from the upstream's own events and holds
    the final one (message_stop) until settle; this turns what it hands on into chunks.
    """

    __slots__ = ("_meter", "_t", "_id", "_model", "_created", "_blocks", "_tools", "_usage", "_head", "_signed",
                 "_signature")

    def __init__(self, meter: StreamMeter, translation: ChatViaMessages) -> None:
        self._meter = meter
        self._t = translation
        self._id: Any = None
        self._model: Any = None
        self._created = int(time.time())
        self._blocks: dict[int, tuple[str, int]] = {}
        """content block index -> (kind, tool call index)"""
        self._tools = 0
        self._usage: dict[str, Any] = {}
        self._head = b""
        self._signed = 0
        """thinking blocks passed on (their index in ``thinking_blocks``)"""
        self._signature = ""
        """The start of every chunk of this stream, up to its delta (the text deltas are templated)."""

    def feed(self, chunk: bytes) -> bytes:
        return self._translate(self._meter.feed(chunk))

    def finish(self) -> bytes:
        return self._translate(self._meter.finish())

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse_data({"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                         "model": self._model,
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    def _translate(self, data: bytes) -> bytes:
        if not data:
            return data
        out: list[bytes] = []
        head = self._head
        for payload in events(data):
            text = _TEXT_DELTA.match(payload) if head else None
            if text is not None:  # most events: the JSON string literal goes out as it came
                out.append(b'%s{"content":%s}%s' % (head, text.group(1).encode(), _TAIL))
                continue
            event = parse(payload)
            if isinstance(event, dict):
                try:
                    self._event(event, out)
                except SHAPE_ERRORS as exc:
                    skipped(exc)
                head = self._head
        return b"".join(out)

    def _event(self, event: dict[str, Any], out: list[bytes]) -> None:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            block, tool = self._blocks.get(event.get("index", -1), ("text", 0))
            dtype = delta.get("type")
            if dtype == "text_delta" and isinstance(delta.get("text"), str):
                out.append(b'%s{"content":%s}%s' % (self._head, quote(delta["text"]).encode(), _TAIL))
            elif dtype == "input_json_delta":
                part = delta.get("partial_json", "")
                if block == "json":
                    out.append(self._chunk({"content": part}))
                else:
                    out.append(self._chunk({"tool_calls": [{"index": tool, "function": {"arguments": part}}]}))
            elif dtype == "thinking_delta":
                out.append(self._chunk({"reasoning_content": delta.get("thinking", "")}))
            elif dtype == "signature_delta":
                self._signature += delta.get("signature", "")
        elif kind == "content_block_stop":
            if self._blocks.get(event.get("index", -1), ("", 0))[0] == "thinking":
                self._thinking_block({"type": "thinking", "signature": self._signature}, out)
                self._signature = ""
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            index = event.get("index", len(self._blocks))
            btype = block.get("type")
            if btype == "tool_use" and self._t.json_mode:
                self._blocks[index] = ("json", 0)
            elif btype == "tool_use":
                self._blocks[index] = ("tool", self._tools)
                out.append(self._chunk({"tool_calls": [{"index": self._tools, "id": block.get("id"),
                                                        "type": "function",
                                                        "function": {"name": block.get("name"), "arguments": ""}}]}))
                self._tools += 1
            elif btype == "redacted_thinking":
                self._thinking_block({"type": "redacted_thinking", "data": block.get("data", "")}, out)
            else:
                self._blocks[index] = (btype or "text", 0)
                self._signature = block.get("signature") or ""
                if btype == "text" and block.get("text"):
                    out.append(self._chunk({"content": block["text"]}))
        elif kind == "message_start":
            message = event.get("message") or {}
            self._id, self._model = message.get("id"), message.get("model")
            self._head = (f'data: {{"id":{json.dumps(self._id)},"object":"chat.completion.chunk",'
                          f'"created":{self._created},"model":{json.dumps(self._model)},'
                          '"choices":[{"index":0,"delta":').encode()
            self._merge_usage(message.get("usage"))
            out.append(self._chunk({"role": "assistant", "content": "", "refusal": None}))
        elif kind == "message_delta":
            self._merge_usage(event.get("usage"))
            out.append(self._chunk({}, self._t._finish((event.get("delta") or {}).get("stop_reason")) or "stop"))
            if self._t.include_usage:
                out.append(sse_data({"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                                     "model": self._model, "choices": [], "usage": chat_usage(self._usage)}))
        elif kind == "message_stop":
            out.append(b"data: [DONE]\n\n")
        elif kind == "error":
            err = event.get("error") or {}
            out.append(sse_data({"error": {"message": err.get("message"), "type": err.get("type"),
                                           "param": None, "code": None}}))
        # ping has no chat counterpart.

    def _thinking_block(self, block: dict[str, Any], out: list[bytes]) -> None:
        out.append(self._chunk({"thinking_blocks": [{"index": self._signed, **block}]}))
        self._signed += 1

    def _merge_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self._usage.update({k: v for k, v in usage.items() if v is not None})


_TAIL = b',"logprobs":null,"finish_reason":null}]}\n\n'
_TEXT_DELTA = re.compile(r'\{"type": ?"content_block_delta", ?"index": ?\d+, ?"delta": ?\{"type": ?"text_delta", ?'
                         r'"text": ?("[^"\\]*(?:\\.[^"\\]*)*")\}\}\s*$')


# ------------------------------------------------------------------ request parts

def _messages(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            refuse(f"messages[{i}]", "must be an object.")
        role = m.get("role")
        content = m.get("content")
        where = f"messages[{i}].content"
        if role in ("system", "developer"):
            system += _text_blocks(content, where)
        elif role == "user":
            _append(turns, "user", _user_blocks(content, where))
        elif role == "assistant":
            blocks = _thinking_blocks(m, i) + _text_blocks(content, where, allow_refusal=True)
            for j, call in enumerate(m.get("tool_calls") or []):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or call.get("type", "function") != "function":
                    refuse(f"messages[{i}].tool_calls[{j}]", "must be a function call.")
                try:
                    arguments = json.loads(fn.get("arguments") or "{}")
                except (TypeError, ValueError):
                    refuse(f"messages[{i}].tool_calls[{j}].function.arguments", "must be a JSON object string.")
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                               "input": arguments if isinstance(arguments, dict) else {}})
            if m.get("function_call") is not None:
                refuse(f"messages[{i}].function_call", "is the legacy form; send tool_calls.")
            _append(turns, "assistant", blocks)
        elif role == "tool":
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.get("tool_call_id")}
            blocks = _text_blocks(content, where)
            if blocks:
                result["content"] = blocks
            _append(turns, "user", [result])
        else:
            refuse(f"messages[{i}].role", "must be system, developer, user, assistant or tool here.")
    return system, turns


def _thinking_blocks(m: dict[str, Any], i: int) -> list[dict[str, Any]]:
    """Claude's signed thinking, when the client sends it back (required before tool results)."""
    signed = m.get("thinking_blocks")
    if not signed:
        return []
    if not isinstance(signed, list):
        refuse(f"messages[{i}].thinking_blocks", "must be the array a previous answer carried.")
    blocks = []
    reasoning = m.get("reasoning_content")
    for block in signed:
        if isinstance(block, dict) and block.get("type") == "redacted_thinking":
            blocks.append({"type": "redacted_thinking", "data": block.get("data")})
        elif isinstance(block, dict) and block.get("type") == "thinking":
            # Streams carry the text in reasoning_content only; one thinking block per answer is the norm.
            text = block.get("thinking") or (reasoning if isinstance(reasoning, str) else "")
            reasoning = ""
            blocks.append({"type": "thinking", "thinking": text, "signature": block.get("signature")})
    return blocks


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    # Anthropic alternates user and assistant turns: consecutive ones of a role (parallel tool results) merge.
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"] += blocks
    else:
        turns.append({"role": role, "content": blocks})


def _text_blocks(content: Any, where: str, allow_refusal: bool = False) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        refuse(where, "must be a string or an array of content parts.")
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" or (allow_refusal and kind == "refusal"):
            text = part.get(kind)
            if text:
                blocks.append({"type": "text", "text": text})
        else:
            refuse(f"{where}[{j}]", f"of type {kind!r} cannot be sent here to this model's provider (Anthropic).")
    return blocks


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return _text_blocks(content, where)
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                refuse(f"{where}[{j}].image_url.url", "must be a URL.")
            if url.startswith("data:"):
                media, data = parse_data_url(url, f"{where}[{j}].image_url.url")
                blocks.append({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})
            else:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
        elif kind == "file" and isinstance(part.get("file"), dict) and part["file"].get("file_data"):
            media, data = parse_data_url(part["file"]["file_data"], f"{where}[{j}].file.file_data")
            blocks.append({"type": "document", "source": {"type": "base64", "media_type": media, "data": data}})
        else:
            refuse(f"{where}[{j}]", f"of type {kind!r} cannot be sent to this model's provider (Anthropic).")
    return blocks


def _tool(tool: Any, i: int) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if tool.get("type") != "function" or not isinstance(fn, dict):
        refuse(f"tools[{i}]", "must be a function tool on this model's provider (Anthropic).")
    out = {"name": fn.get("name"), "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if fn.get("description"):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        out = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        out = {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        refuse("tool_choice", "must be auto, none, required or a named function.")
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out
