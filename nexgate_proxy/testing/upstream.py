"""A real local fake of the upstream providers, for end-to-end tests.

It serves the OpenAI and Anthropic APIs on a real socket, records what it
received, remembers the exact bytes it sent, and can be told to misbehave:
fail with a status, hang, or cut a stream in the middle.

Served: OpenAI ``/v1/chat/completions`` (plain and SSE, with
``stream_options.include_usage``), ``/v1/completions``, ``/v1/embeddings``,
``/v1/responses`` (plain and SSE) and Anthropic ``/v1/messages`` (plain and
SSE, in Anthropic's exact event sequence: message_start, ping,
content_block_start/delta/stop per block, message_delta, message_stop). Script
it through ``upstream.behaviour`` (a ``Behaviour``): set fields, or assign a
new ``Behaviour(...)``, before the request it should affect. ``chat_message``
and ``anthropic_content`` script whole answers (tool calls, reasoning,
thinking); errors come in the dialect of the path asked.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Behaviour:
    status: int = 200
    """Answer with this status (and an error body in the path's dialect) instead of a completion."""
    error_body: bytes | None = None
    delay_headers: float = 0.0
    """Seconds to wait before sending the response headers."""
    cut_after_chunks: int | None = None
    """Streams: close the connection abruptly after this many chunks."""
    stall_after_chunks: int | None = None
    """Streams: stop sending (without closing) after this many chunks."""
    chunk_delay: float = 0.0
    words: list[str] = field(default_factory=lambda: ["Hello", "from", "upstream"])
    extra_headers: dict[str, str] = field(default_factory=dict)
    """Sent with every answer, errors too (e.g. ``Retry-After`` on a 429)."""
    chat_message: dict[str, Any] | None = None
    """Chat completions: this assistant message (content, tool_calls, reasoning_content) instead of the words."""
    finish_reason: str = "stop"
    anthropic_content: list[dict[str, Any]] | None = None
    """Messages: these content blocks (text, tool_use, thinking) instead of "Bonjour"."""
    stop_reason: str = "end_turn"
    omit_usage: bool = False
    """Non-streamed answers: leave out ``usage``, as some OpenAI-compatible servers do."""
    stream_error: dict[str, Any] | None = None
    """Streams: send this error event (the path's dialect) after the first content event, then end."""
    usage: dict[str, Any] | None = None
    """Scripted answers (chat_message, anthropic_content): this usage object, in the path's dialect."""


def chat_body(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                  "prompt_tokens_details": {"cached_tokens": 3}},
    }


class FakeUpstream:
    """One fake provider on 127.0.0.1; ``url`` is its OpenAI base URL (with /v1)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.sent: list[bytes] = []
        self.behaviour = Behaviour()
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages", self._messages)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------- handlers

    async def _prologue(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        body = await request.json()
        self.received.append(Received(request.path, dict(request.headers), body))
        b = self.behaviour
        if b.delay_headers:
            await asyncio.sleep(b.delay_headers)
        if b.status != 200:
            if request.path == "/v1/messages":
                default = {"type": "error", "error": {"type": "api_error" if b.status >= 500 else
                                                      "invalid_request_error", "message": "upstream says no"}}
            else:
                default = {"error": {"message": "upstream says no", "type": "server_error", "param": None,
                                     "code": None}}
            payload = b.error_body or json.dumps(default).encode()
            return body, web.Response(status=b.status, body=payload, content_type="application/json",
                                      headers=b.extra_headers)
        return body, None

    async def _json(self, payload: dict[str, Any]) -> web.Response:
        if self.behaviour.omit_usage:
            payload = {k: v for k, v in payload.items() if k != "usage"}
        raw = json.dumps(payload).encode()
        self.sent.append(raw)
        return web.Response(body=raw, content_type="application/json",
                            headers={"x-request-id": "up-req-1", "openai-organization": "org-secret-upstream",
                                     "x-ratelimit-remaining-requests": "999", **self.behaviour.extra_headers})

    async def _stream(self, request: web.Request, events: list[bytes]) -> web.StreamResponse:
        b = self.behaviour
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-request-id": "up-req-2",
                                           **b.extra_headers})
        await resp.prepare(request)
        sent = bytearray()
        delay = b.chunk_delay  # fixed per stream: a test may change the behaviour for later requests
        for i, event in enumerate(events):
            if b.cut_after_chunks is not None and i >= b.cut_after_chunks:
                self.sent.append(bytes(sent))
                assert request.transport is not None
                request.transport.abort()  # a reset, not a clean end
                return resp
            if b.stall_after_chunks is not None and i >= b.stall_after_chunks:
                self.sent.append(bytes(sent))
                await asyncio.sleep(3600)
            if delay:
                await asyncio.sleep(delay)
            await resp.write(event)
            sent += event
        self.sent.append(bytes(sent))
        await resp.write_eof()
        return resp

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._prologue(request)
        if failure:
            return failure
        model = body["model"]
        if self.behaviour.chat_message is not None:
            return await self._scripted_chat(request, body)
        if not body.get("stream"):
            return await self._json(chat_body(model, " ".join(self.behaviour.words)))
        with_usage = (body.get("stream_options") or {}).get("include_usage") is True
        events = []
        for i, word in enumerate(self.behaviour.words):
            chunk: dict[str, Any] = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
                                     "model": model,
                                     "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word},
                                                  "finish_reason": None}]}
            if with_usage:
                chunk["usage"] = None
            events.append(f"data: {json.dumps(chunk)}\n\n".encode())
        if with_usage:
            final = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
                     "model": model, "choices": [],
                     "usage": {"prompt_tokens": 11, "completion_tokens": len(self.behaviour.words),
                               "total_tokens": 11 + len(self.behaviour.words)}}
            events.append(f"data: {json.dumps(final)}\n\n".encode())
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, events)

    async def _scripted_chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        b = self.behaviour
        message = {"role": "assistant", "content": None, "refusal": None, **(b.chat_message or {})}
        usage = b.usage or {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29,
                            "prompt_tokens_details": {"cached_tokens": 4}}
        base = {"id": "chatcmpl-scripted", "created": 1700000000, "model": body["model"]}
        if not body.get("stream"):
            return await self._json({**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": b.finish_reason}]})

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return _data({**base, "object": "chat.completion.chunk",
                          "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        events = [chunk({"role": "assistant", "content": ""})]
        for piece in _pieces(message.get("reasoning_content")):
            events.append(chunk({"reasoning_content": piece}))
        if b.stream_error is not None:
            events += [chunk({"content": "partial"}), _data(b.stream_error)]
        for piece in _pieces(message.get("content")):
            events.append(chunk({"content": piece}))
        for index, call in enumerate(message.get("tool_calls") or []):
            fn = call["function"]
            events.append(chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                                 "function": {"name": fn["name"], "arguments": ""}}]}))
            for piece in _pieces(fn["arguments"]):
                events.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
        events.append(chunk({}, b.finish_reason))
        if (body.get("stream_options") or {}).get("include_usage") is True:
            events.append(_data({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, events)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._prologue(request)
        if failure:
            return failure
        return await self._json({
            "id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": body["model"],
            "choices": [{"index": 0, "text": " world", "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        })

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._prologue(request)
        if failure:
            return failure
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return await self._json({
            "object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))],
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        })

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._prologue(request)
        if failure:
            return failure
        response = {
            "id": "resp_fake", "object": "response", "created_at": 1700000000, "status": "completed",
            "model": body["model"],
            "output": [{"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "Hi there", "annotations": []}]}],
            "usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 11},
        }
        if not body.get("stream"):
            return await self._json(response)
        events = [
            _event("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 0,
                                                  "item_id": "msg_fake", "output_index": 0, "content_index": 0,
                                                  "delta": "Hi there"}),
            _event("response.completed", {"type": "response.completed", "sequence_number": 1,
                                          "response": response}),
        ]
        return await self._stream(request, events)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._prologue(request)
        if failure:
            return failure
        if self.behaviour.anthropic_content is not None:
            return await self._scripted_messages(request, body)
        if not body.get("stream"):
            return await self._json({
                "id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"],
                "content": [{"type": "text", "text": "Bonjour"}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 3,
                                                 "cache_read_input_tokens": 5, "cache_creation_input_tokens": 0},
            })
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"], "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 5,
                             "cache_creation_input_tokens": 0}}
        events = [
            _event("message_start", {"type": "message_start", "message": message}),
            _event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
            _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": "Bonjour"}}),
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                        "stop_sequence": None},
                                     "usage": {"output_tokens": 3}}),
            _event("message_stop", {"type": "message_stop"}),
        ]
        return await self._stream(request, events)


    async def _scripted_messages(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        b = self.behaviour
        content = b.anthropic_content or []
        usage = b.usage or {"input_tokens": 30, "output_tokens": 15, "cache_read_input_tokens": 6,
                            "cache_creation_input_tokens": 2}
        base = {"id": "msg_scripted", "type": "message", "role": "assistant", "model": body["model"]}
        if not body.get("stream"):
            return await self._json({**base, "content": content, "stop_reason": b.stop_reason,
                                     "stop_sequence": None, "usage": usage})
        events = [
            _event("message_start", {"type": "message_start", "message": {
                **base, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {**usage, "output_tokens": 1}}}),
            _event("ping", {"type": "ping"}),
        ]
        for index, block in enumerate(content):
            kind = block["type"]
            start = {"text": {"type": "text", "text": ""},
                     "thinking": {"type": "thinking", "thinking": "", "signature": ""},
                     "tool_use": {**block, "input": {}}}[kind]
            events.append(_event("content_block_start", {"type": "content_block_start", "index": index,
                                                         "content_block": start}))
            if kind == "text":
                deltas = [{"type": "text_delta", "text": p} for p in _pieces(block["text"])]
            elif kind == "thinking":
                deltas = [{"type": "thinking_delta", "thinking": p} for p in _pieces(block["thinking"])]
                deltas.append({"type": "signature_delta", "signature": block.get("signature", "sig")})
            else:
                deltas = [{"type": "input_json_delta", "partial_json": p} for p in _pieces(json.dumps(block["input"]))]
            for delta in deltas:
                events.append(_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                             "delta": delta}))
                if b.stream_error is not None:
                    events.append(_event("error", b.stream_error))
                    return await self._stream(request, events)
            events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        events += [
            _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": b.stop_reason,
                                                                        "stop_sequence": None},
                                     "usage": {"output_tokens": usage["output_tokens"]}}),
            _event("message_stop", {"type": "message_stop"}),
        ]
        return await self._stream(request, events)


def _pieces(text: str | None, size: int = 5) -> list[str]:
    """A scripted text in stream-sized pieces."""
    return [text[i:i + size] for i in range(0, len(text), size)] if text else []


def _data(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
