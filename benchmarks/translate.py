#!/usr/bin/env python
"""CPU per request of translating a typical chat call between the OpenAI and Anthropic dialects.

What the proxy adds when a client of one dialect reaches a model of the other: the request body
(a system prompt and a few turns, as parsed by the proxy) to the upstream's bytes, then the
upstream's answer back to the client's bytes, non-streamed and streamed (a 40-event SSE answer
fed in network-sized pieces through the stream meter, as the relay does). Counted in process CPU
time over many rounds; the target is under 100 us per request.

    .venv/bin/python benchmarks/translate.py            # about 10 seconds
    .venv/bin/python benchmarks/translate.py --rounds 2000
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

from nexgate_proxy.config import ModelRoute, Target
from nexgate_proxy.context import Usage
from nexgate_proxy.translate import ChatViaMessages, MessagesViaChat
from nexgate_proxy.usage import StreamMeter, usage_from_body

TARGET = Target(provider="p", model="upstream-model")
ROUTE = ModelRoute(alias="m", targets=(TARGET,))
TEXT = "A typical answer of a few sentences, split into the pieces a model streams. " * 4
WORDS = TEXT.split(" ")

OPENAI_REQUEST = {"model": "m", "temperature": 0.7, "max_tokens": 512, "messages": [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly and precisely."},
    {"role": "user", "content": "What is the capital of France, and why is it famous?"},
    {"role": "assistant", "content": "Paris. It is famous for its art, food and history."},
    {"role": "user", "content": "Tell me three museums to visit there, with one line on each."}]}
ANTHROPIC_REQUEST = {"model": "m", "max_tokens": 512, "temperature": 0.7,
                     "system": "You are a helpful assistant. Answer briefly and precisely.",
                     "messages": [m for m in OPENAI_REQUEST["messages"] if m["role"] != "system"]}

ANTHROPIC_ANSWER = json.dumps({
    "id": "msg_1", "type": "message", "role": "assistant", "model": "upstream-model",
    "content": [{"type": "text", "text": TEXT}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 60, "output_tokens": 50, "cache_read_input_tokens": 0}}).encode()
OPENAI_ANSWER = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "upstream-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 60, "completion_tokens": 50, "total_tokens": 110}}).encode()


def _anthropic_stream() -> list[bytes]:
    def ev(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
    events = [ev("message_start", {"type": "message_start", "message": {
                  "id": "msg_1", "type": "message", "role": "assistant", "model": "upstream-model", "content": [],
                  "stop_reason": None, "usage": {"input_tokens": 60, "output_tokens": 1}}}),
              ev("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}})]
    events += [ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": w + " "}}) for w in WORDS]
    events += [ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                    "usage": {"output_tokens": 50}}),
               ev("message_stop", {"type": "message_stop"})]
    return events


def _openai_stream() -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return ("data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "u",
                                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                + "\n\n").encode()
    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": w + " "}) for w in WORDS]
    events += [chunk({}, "stop"), ("data: " + json.dumps({"id": "c", "choices": [], "usage": {
        "prompt_tokens": 60, "completion_tokens": 50, "total_tokens": 110}}) + "\n\n").encode(), b"data: [DONE]\n\n"]
    return events


def _pieces(events: list[bytes], per_read: int = 3) -> list[bytes]:
    return [b"".join(events[i:i + per_read]) for i in range(0, len(events), per_read)]


def translated(kind: type, request: dict, answer: bytes, stream: bool, pieces: list[bytes]) -> Callable[[], None]:
    """One request and its answer through a translation, streamed (``pieces``) or not."""
    def run() -> None:
        t = kind(dict(request, stream=stream))
        t.request(TARGET, ROUTE)
        usage = Usage()
        if stream:
            meter = t.meter(StreamMeter(usage))
            for piece in pieces:
                meter.feed(piece)
            meter.finish()
        else:
            usage_from_body(usage, answer)
            t.response(answer)
    return run


def chat_to_claude(stream: bool, pieces: list[bytes]) -> Callable[[], None]:
    return translated(ChatViaMessages, OPENAI_REQUEST, ANTHROPIC_ANSWER, stream, pieces)


def messages_to_gpt(stream: bool, pieces: list[bytes]) -> Callable[[], None]:
    return translated(MessagesViaChat, ANTHROPIC_REQUEST, OPENAI_ANSWER, stream, pieces)


def baseline(stream: bool, pieces: list[bytes], answer: bytes) -> Callable[[], None]:
    """What the same-dialect path does with the same answer: meter it, nothing else."""
    def run() -> None:
        usage = Usage()
        if stream:
            meter = StreamMeter(usage)
            for piece in pieces:
                meter.feed(piece)
            meter.finish()
        else:
            usage_from_body(usage, answer)
    return run


def per_call_us(fn: Callable[[], None], rounds: int) -> float:
    for _ in range(rounds // 10):
        fn()
    best = float("inf")
    for _ in range(5):  # best of 5: the machine's other work only ever adds time
        start = time.process_time()
        for _ in range(rounds):
            fn()
        best = min(best, (time.process_time() - start) / rounds * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1000)
    args = parser.parse_args()
    a_stream, o_stream = _pieces(_anthropic_stream()), _pieces(_openai_stream())
    rows = [
        ("OpenAI client -> Anthropic upstream", chat_to_claude, a_stream, ANTHROPIC_ANSWER),
        ("Anthropic client -> OpenAI upstream", messages_to_gpt, o_stream, OPENAI_ANSWER),
    ]
    print(f"{'direction':38} {'mode':7} {'total us':>9} {'metering us':>12} {'translation us':>15}")
    for name, make, pieces, answer in rows:
        for stream in (False, True):
            total = per_call_us(make(stream, pieces), args.rounds)
            meter = per_call_us(baseline(stream, pieces, answer), args.rounds)
            mode = "stream" if stream else "body"
            print(f"{name:38} {mode:7} {total:9.1f} {meter:12.1f} {total - meter:15.1f}")
    print(f"({len(WORDS)} content events per stream; translation = total - what the same-dialect path "
          "spends metering the same answer)")


if __name__ == "__main__":
    main()
