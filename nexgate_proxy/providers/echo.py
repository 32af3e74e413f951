"""`type: echo`: an offline provider for the demo and for trying plugins.

It answers every operation in the upstream's own format, streamed or not,
by echoing the last user message. It makes no network call, so
``nexgate serve --demo`` runs the real chain without any provider account.
Option ``chunk_delay_ms`` spaces streamed chunks to make streaming visible.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator

from multidict import CIMultiDict, CIMultiDictProxy

from .. import hookimpl
from .base import BodyTooLarge, Provider

if TYPE_CHECKING:
    import aiohttp

    from ..config import Target
    from ..context import RequestContext
    from ..endpoints import Endpoint

_JSON = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
_SSE = CIMultiDictProxy(CIMultiDict({"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prompt_text(endpoint: str, body: dict[str, Any]) -> str:
    if endpoint in ("chat.completions", "messages", "messages.count_tokens"):
        messages = body.get("messages") or []
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text_of(message.get("content"))
        return ""
    if endpoint == "responses":
        value = body.get("input")
        if isinstance(value, list):
            return " ".join(_text_of(m.get("content")) for m in value if isinstance(m, dict))
        return _text_of(value)
    value = body.get("prompt") if endpoint == "completions" else body.get("input")
    if isinstance(value, list):
        return " ".join(v for v in value if isinstance(v, str))
    return value if isinstance(value, str) else ""


def _count(text: str) -> int:
    # A rough token count: good enough for a demo, never used for real billing.
    return max(1, len(text.split()))


class EchoResponse:
    def __init__(self, status: int, headers: CIMultiDictProxy[str], chunks: list[bytes], delay: float) -> None:
        self.status = status
        self.headers = headers
        self._chunks = chunks
        self._delay = delay

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            if self._delay:
                await asyncio.sleep(self._delay)
            yield chunk

    async def read(self, limit: int) -> bytes:
        body = b"".join(self._chunks)
        if len(body) > limit:
            raise BodyTooLarge
        return body

    def close(self) -> None:
        self._chunks = []


class EchoProvider(Provider):
    type_name = "echo"
    api_formats = frozenset({"openai", "anthropic"})

    async def send(
        self,
        ctx: RequestContext,
        target: Target,
        endpoint: Endpoint,
        body: bytes,
        headers: dict[str, str],
        session: aiohttp.ClientSession,
        timeout: aiohttp.ClientTimeout,
    ) -> EchoResponse:
        request = json.loads(body)
        prompt = _prompt_text(endpoint.name, request)
        reply = f"Echo: {prompt}" if prompt else "Echo: (no text in the request)"
        words = reply.split(" ")
        usage_in, usage_out = _count(prompt), len(words)
        delay = float(self.config.options.get("chunk_delay_ms", 0)) / 1000
        build = _BUILDERS[endpoint.name]
        if request.get("stream") and endpoint.streams:
            events = build.stream(target.model, words, usage_in, usage_out, request)
            return EchoResponse(200, _SSE, [_sse(e, n) for n, e in events], delay)
        payload = build.body(target.model, reply, usage_in, usage_out, request)
        return EchoResponse(200, _JSON, [json.dumps(payload).encode()], 0.0)


def _sse(data: Any, event: str | None) -> bytes:
    line = "data: [DONE]" if data == "[DONE]" else f"data: {json.dumps(data)}"
    return (f"event: {event}\n{line}\n\n" if event else f"{line}\n\n").encode()


def _id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class _Chat:
    @staticmethod
    def body(model: str, reply: str, n_in: int, n_out: int, req: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": _id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
        }

    @staticmethod
    def stream(model: str, words: list[str], n_in: int, n_out: int, req: dict[str, Any]) -> list[tuple[str | None, Any]]:
        cid, created = _id("chatcmpl-"), int(time.time())
        with_usage = bool((req.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            c: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if with_usage:
                c["usage"] = None
            return c

        events: list[tuple[str | None, Any]] = [(None, chunk({"role": "assistant", "content": ""}, None))]
        events += [(None, chunk({"content": w if i == 0 else " " + w}, None)) for i, w in enumerate(words)]
        events.append((None, chunk({}, "stop")))
        if with_usage:
            events.append((None, {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                  "choices": [], "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                                                           "total_tokens": n_in + n_out}}))
        events.append((None, "[DONE]"))
        return events


class _Completions:
    @staticmethod
    def body(model: str, reply: str, n_in: int, n_out: int, req: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": _id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": reply, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
        }

    @staticmethod
    def stream(model: str, words: list[str], n_in: int, n_out: int, req: dict[str, Any]) -> list[tuple[str | None, Any]]:
        cid, created = _id("cmpl-"), int(time.time())
        with_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        events: list[tuple[str | None, Any]] = [
            (None, {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": w if i == 0 else " " + w, "logprobs": None,
                                 "finish_reason": "stop" if i == len(words) - 1 else None}]})
            for i, w in enumerate(words)
        ]
        if with_usage:
            events.append((None, {"id": cid, "object": "text_completion", "created": created, "model": model,
                                  "choices": [], "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                                                           "total_tokens": n_in + n_out}}))
        events.append((None, "[DONE]"))
        return events


class _Embeddings:
    @staticmethod
    def body(model: str, reply: str, n_in: int, n_out: int, req: dict[str, Any]) -> dict[str, Any]:
        inputs = req.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        dims = int(req.get("dimensions") or 8)
        data = [{"object": "embedding", "index": i, "embedding": _vector(str(x), dims)} for i, x in enumerate(items)]
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": n_in, "total_tokens": n_in}}

    stream = None


def _vector(text: str, dims: int) -> list[float]:
    # Deterministic pseudo-embedding: the same text always maps to the same vector.
    digest = b""
    counter = 0
    while len(digest) < dims * 4:
        digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    return [round(v / 2**32 * 2 - 1, 6) for v in struct.unpack(f"<{dims}I", digest[: dims * 4])]


class _Responses:
    @staticmethod
    def _response(model: str, rid: str, reply: str, n_in: int, n_out: int, status: str) -> dict[str, Any]:
        return {
            "id": rid, "object": "response", "created_at": int(time.time()), "status": status, "model": model,
            "output": [] if status != "completed" else [{
                "type": "message", "id": rid.replace("resp_", "msg_"), "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": reply, "annotations": []}]}],
            "usage": None if status != "completed" else {
                "input_tokens": n_in, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": n_in + n_out},
        }

    @classmethod
    def body(cls, model: str, reply: str, n_in: int, n_out: int, req: dict[str, Any]) -> dict[str, Any]:
        return cls._response(model, _id("resp_"), reply, n_in, n_out, "completed")

    @classmethod
    def stream(cls, model: str, words: list[str], n_in: int, n_out: int, req: dict[str, Any]) -> list[tuple[str | None, Any]]:
        rid = _id("resp_")
        item_id = rid.replace("resp_", "msg_")
        reply = " ".join(words)
        seq = iter(range(10_000))
        events: list[tuple[str | None, Any]] = [
            ("response.created", {"type": "response.created", "sequence_number": next(seq),
                                  "response": cls._response(model, rid, reply, n_in, n_out, "in_progress")}),
        ]
        for i, w in enumerate(words):
            events.append(("response.output_text.delta", {
                "type": "response.output_text.delta", "sequence_number": next(seq), "item_id": item_id,
                "output_index": 0, "content_index": 0, "delta": w if i == 0 else " " + w}))
        events.append(("response.output_text.done", {
            "type": "response.output_text.done", "sequence_number": next(seq), "item_id": item_id,
            "output_index": 0, "content_index": 0, "text": reply}))
        events.append(("response.completed", {"type": "response.completed", "sequence_number": next(seq),
                                              "response": cls._response(model, rid, reply, n_in, n_out, "completed")}))
        return events


class _Messages:
    @staticmethod
    def body(model: str, reply: str, n_in: int, n_out: int, req: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": _id("msg_"), "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": reply}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": n_in, "output_tokens": n_out},
        }

    @staticmethod
    def stream(model: str, words: list[str], n_in: int, n_out: int, req: dict[str, Any]) -> list[tuple[str | None, Any]]:
        message = {"id": _id("msg_"), "type": "message", "role": "assistant", "model": model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": n_in, "output_tokens": 1}}
        events: list[tuple[str | None, Any]] = [
            ("message_start", {"type": "message_start", "message": message}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
        ]
        for i, w in enumerate(words):
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": w if i == 0 else " " + w}}))
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": n_out}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        return events


class _CountTokens:
    @staticmethod
    def body(model: str, reply: str, n_in: int, n_out: int, req: dict[str, Any]) -> dict[str, Any]:
        return {"input_tokens": n_in}

    stream = None


class _Moderations:
    @staticmethod
    def body(model: str, reply: str, n_in: int, n_out: int, req: dict[str, Any]) -> dict[str, Any]:
        inputs = req.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        categories = ("harassment", "hate", "self-harm", "sexual", "violence")
        return {"id": _id("modr-"), "model": model, "results": [
            {"flagged": False, "categories": {c: False for c in categories},
             "category_scores": {c: 0.0 for c in categories}} for _ in items]}

    stream = None


_BUILDERS: dict[str, Any] = {
    "chat.completions": _Chat,
    "completions": _Completions,
    "embeddings": _Embeddings,
    "responses": _Responses,
    "messages": _Messages,
    "messages.count_tokens": _CountTokens,
    "moderations": _Moderations,
}


@hookimpl
def nexgate_register_providers() -> dict[str, type[Provider]]:
    return {EchoProvider.type_name: EchoProvider}
