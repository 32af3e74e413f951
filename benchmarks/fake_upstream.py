"""A fast fake OpenAI upstream for load tests: raw asyncio.Protocol HTTP/1.1 on uvloop.

``POST .../chat/completions`` answers a fixed small chat completion with a
``usage`` object. With ``"stream": true`` in the body it answers a short SSE
stream (role chunk, three content chunks, a finish chunk, a usage chunk and
``data: [DONE]``), chunked-encoded, one event per event-loop tick so that a
proxy really receives several reads per stream, as it would from a provider.
``GET /health`` answers ``ok``. Keep-alive, pipelining-safe, no allocations
beyond the request buffer: a few microseconds per request, so it is never the
bottleneck of a benchmark (``run.py`` measures its ceiling directly).

Bounded: it exits after ``--max-seconds`` or when its parent process goes away.

    python benchmarks/fake_upstream.py --port 9001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal

CHAT_COMPLETION = {
    "id": "chatcmpl-bench0000000000000000000000",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench-model",
    "system_fingerprint": "fp_bench",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "Hello! This is a fixed answer from the fake upstream."},
        "logprobs": None,
        "finish_reason": "stop",
    }],
    "usage": {"prompt_tokens": 21, "completion_tokens": 12, "total_tokens": 33,
              "prompt_tokens_details": {"cached_tokens": 0}},
}


def _chunk(delta: dict, finish: str | None) -> dict:
    return {"id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion.chunk",
            "created": 1700000000, "model": "bench-model", "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": None}


STREAM_EVENTS: list[object] = [
    _chunk({"role": "assistant", "content": ""}, None),
    _chunk({"content": "Hello!"}, None),
    _chunk({"content": " A fixed"}, None),
    _chunk({"content": " streamed answer."}, None),
    _chunk({}, "stop"),
    {"id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion.chunk", "created": 1700000000,
     "model": "bench-model", "system_fingerprint": "fp_bench", "choices": [],
     "usage": {"prompt_tokens": 21, "completion_tokens": 5, "total_tokens": 26}},
    "[DONE]",
]


def _sse(event: object) -> bytes:
    data = "[DONE]" if event == "[DONE]" else json.dumps(event, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


JSON_BODY = json.dumps(CHAT_COMPLETION, separators=(",", ":")).encode()
JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"openai-processing-ms: 1\r\nx-request-id: req_bench\r\n\r\n%s" % (len(JSON_BODY), JSON_BODY)
)
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
               b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nx-request-id: req_bench\r\n\r\n")
STREAM_PARTS: list[bytes] = [_chunked(_sse(e)) for e in STREAM_EVENTS]
STREAM_PARTS[0] = STREAM_HEAD + STREAM_PARTS[0]
STREAM_PARTS[-1] = STREAM_PARTS[-1] + b"0\r\n\r\n"
STREAM_WHOLE = b"".join(STREAM_PARTS)
HEALTH_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nnot found"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("transport", "buf", "loop", "streaming", "closed")

    # Set from the command line: write each SSE event in its own loop tick (realistic) or all at once.
    tick_per_event = True
    event_gap = 0.0
    """Seconds between two SSE events (``--event-gap``): long-lived streams, as a model's are."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = bytearray()
        self.loop = asyncio.get_running_loop()
        self.streaming = False
        self.closed = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while not self.streaming:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end + 2])
            m = _CONTENT_LENGTH.search(head)
            length = int(m.group(1)) if m else 0
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4:total])
            del buf[:total]
            if not self._handle(head, body):
                return

    def _handle(self, head: bytes, body: bytes) -> bool:
        """Answer one request; False when the connection is done or busy streaming."""
        line_end = head.find(b"\r\n")
        parts = head[:line_end].split(b" ")
        if len(parts) != 3:
            self.transport.write(BAD_REQUEST)
            self.transport.close()
            return False
        method, path = parts[0], parts[1]
        close = _CONNECTION_CLOSE.search(head) is not None
        if method == b"POST" and path.split(b"?", 1)[0].endswith(b"/chat/completions"):
            if _STREAM_TRUE.search(body):
                if self.tick_per_event:
                    self.streaming = True
                    self._stream(0, close)
                    return False
                self.transport.write(STREAM_WHOLE)
            else:
                self.transport.write(JSON_RESPONSE)
        elif method == b"GET" and path == b"/health":
            self.transport.write(HEALTH_RESPONSE)
        else:
            self.transport.write(NOT_FOUND)
        if close:
            self.transport.close()
            return False
        return True

    def _stream(self, index: int, close: bool) -> None:
        if self.closed:
            return
        self.transport.write(STREAM_PARTS[index])
        if index + 1 < len(STREAM_PARTS):
            if self.event_gap:
                self.loop.call_later(self.event_gap, self._stream, index + 1, close)
            else:
                self.loop.call_soon(self._stream, index + 1, close)
            return
        self.streaming = False
        if close:
            self.transport.close()
        elif self.buf:
            self.data_received(b"")  # a request that arrived while streaming


async def serve(host: str, port: int, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    deadline = loop.time() + max_seconds
    print(f"fake upstream listening on http://{host}:{port}", flush=True)
    while not stop.is_set() and loop.time() < deadline and os.getppid() == parent:
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="exit after this long (default 600)")
    parser.add_argument("--stream-at-once", action="store_true",
                        help="write a whole SSE stream at once instead of one event per loop tick")
    parser.add_argument("--event-gap", type=float, default=0.0,
                        help="seconds between two events of a stream (default 0: one loop tick)")
    args = parser.parse_args()
    UpstreamProtocol.tick_per_event = not args.stream_at_once
    UpstreamProtocol.event_gap = args.event_gap
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(serve(args.host, args.port, args.max_seconds))


if __name__ == "__main__":
    main()
