"""Usage is read from every dialect, and the stream relay keeps events whole."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexgate_proxy import hookimpl
from nexgate_proxy.context import Usage
from nexgate_proxy.usage import StreamMeter, usage_from_body
from nexgate_proxy.testing import FakeUpstream, gateway_config


def openai_chunk(content: str) -> bytes:
    return f'data: {{"choices": [{{"index": 0, "delta": {{"content": "{content}"}}}}], "usage": null}}\n\n'.encode()


USAGE_CHUNK = b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}\n\n'
STREAM = openai_chunk("a") + openai_chunk("b") + USAGE_CHUNK + b"data: [DONE]\n\n"


@pytest.mark.parametrize("size", [1, 2, 7, 64, len(STREAM)])
def test_any_chunking_relays_the_same_whole_events(size: int) -> None:
    usage = Usage()
    meter = StreamMeter(usage)
    out = b"".join(meter.feed(STREAM[i:i + size]) for i in range(0, len(STREAM), size))
    assert b"[DONE]" not in out  # held until settled
    out += meter.finish()
    assert out == STREAM
    assert (usage.prompt_tokens, usage.completion_tokens, usage.reported) == (5, 2, True)


def test_usage_chunk_is_stripped_when_nexgate_asked_for_it() -> None:
    usage = Usage()
    meter = StreamMeter(usage, strip_usage_chunk=True)
    out = meter.feed(STREAM) + meter.finish()
    assert out == openai_chunk("a") + openai_chunk("b") + b"data: [DONE]\n\n"
    assert usage.completion_tokens == 2


def _reference_scan(whole: bytes, strip: bool) -> tuple[bytes, int]:
    """The obvious algorithm: split every event out, drop stripped usage-only events."""
    kept, completion = [], 0
    parts = re.split(rb"(\r?\n\r?\n)", whole)
    for i in range(0, len(parts), 2):
        event, sep = parts[i], parts[i + 1] if i + 1 < len(parts) else b""
        if b'"usage":{' in event or b'"usage": {' in event:
            data = json.loads(b"\n".join(line[5:].lstrip(b" ") for line in event.splitlines()
                                         if line.startswith(b"data:")))
            completion = data["usage"]["completion_tokens"]
            if strip and data.get("choices") == []:
                continue
        kept += [event, sep]
    return b"".join(kept), completion


EVENTS = st.sampled_from([
    b'data: {"choices": [{"delta": {"content": "x"}}], "usage": null}',
    b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}',
    b'data: {"choices": [{"delta": {}}], "usage":{"prompt_tokens": 6, "completion_tokens": 3}}',
    b'event: ping\ndata: {"usage": {"prompt_tokens": 1, "completion_tokens": 9}}',
    b": comment",
])


@settings(max_examples=300, deadline=None)
@given(events=st.lists(st.tuples(EVENTS, st.sampled_from([b"\n\n", b"\r\n\r\n", b"\n\r\n", b"\r\n\n"])),
                       min_size=1, max_size=8), strip=st.booleans())
def test_usage_events_are_found_and_stripped_as_when_every_event_is_split_out(events: list, strip: bool) -> None:
    whole = b"".join(event + sep for event, sep in events)
    usage = Usage()
    out = StreamMeter(usage, strip_usage_chunk=strip)._scan(whole)
    expected, completion = _reference_scan(whole, strip)
    assert out == expected
    assert usage.completion_tokens == completion
    assert usage.stream_events == whole.count(b"data:")


def test_crlf_streams_and_a_last_event_without_blank_line() -> None:
    stream = b'data: {"x": 1}\r\n\r\ndata: {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
    usage = Usage()
    meter = StreamMeter(usage)
    assert meter.feed(stream) == b'data: {"x": 1}\r\n\r\n'
    assert meter.finish().endswith(b"4}}")
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 4)


def test_an_event_after_a_terminal_one_releases_it() -> None:
    meter = StreamMeter(Usage())
    assert meter.feed(b"data: [DONE]\n\n") == b""
    assert meter.feed(b"data: late\n\n") == b"data: [DONE]\n\ndata: late\n\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"usage": {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}},
         (10, 2, 4, 0, 0, 0)),
        # OpenAI: prompt_tokens includes cached, cache-write and audio tokens; completion includes audio.
        ({"usage": {"prompt_tokens": 30, "completion_tokens": 9,
                    "prompt_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 6, "audio_tokens": 10},
                    "completion_tokens_details": {"audio_tokens": 5, "reasoning_tokens": 2}}},
         (30, 9, 4, 6, 10, 5)),
        ({"usage": {"input_tokens": 9, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 1},
                    "total_tokens": 12}}, (9, 3, 1, 0, 0, 0)),
        # Anthropic: input_tokens excludes cache reads and writes.
        ({"usage": {"input_tokens": 5, "output_tokens": 3, "cache_read_input_tokens": 7,
                    "cache_creation_input_tokens": 2}}, (14, 3, 7, 2, 0, 0)),
        ({"usage": {"prompt_tokens": -1, "completion_tokens": "9"}}, (0, 0, 0, 0, 0, 0)),  # untrusted junk
        ({"usage": None}, (0, 0, 0, 0, 0, 0)),
    ],
)
def test_usage_from_json_bodies(body: dict, expected: tuple[int, ...]) -> None:
    usage = Usage()
    usage_from_body(usage, json.dumps(body).encode())
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_write_tokens,
            usage.audio_input_tokens, usage.audio_output_tokens) == expected


def test_an_anthropic_stream_keeps_the_cache_counts_of_message_start() -> None:
    usage = Usage()
    meter = StreamMeter(usage)
    meter.feed(b'event: message_start\ndata: {"type": "message_start", "message": {"usage": {"input_tokens": 5, '
               b'"cache_read_input_tokens": 7, "cache_creation_input_tokens": 2, "output_tokens": 1}}}\n\n'
               b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 3}}\n\n')
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_write_tokens) == (14, 3, 7, 2)


def test_anthropic_one_hour_cache_writes_are_read() -> None:
    usage = Usage()
    usage_from_body(usage, json.dumps({"usage": {
        "input_tokens": 5, "output_tokens": 3, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 9,
        "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 5}}}).encode())
    assert (usage.prompt_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens) == (14, 9, 5)


async def test_settle_runs_before_the_client_sees_the_end_of_a_stream(upstream: FakeUpstream,
                                                                       start_gateway) -> None:
    loop = asyncio.get_running_loop()
    marks: dict[str, float] = {}

    class SlowSettle:
        @hookimpl
        async def nexgate_settle(self, ctx):
            marks["settle_start"] = loop.time()
            await asyncio.sleep(0.3)
            marks["settle_end"] = loop.time()

    gw = await start_gateway(gateway_config(upstream), plugins=[SlowSettle()])
    upstream.behaviour.chunk_delay = 0.05
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gw.api_key}"}) as session:
        async with session.post(gw.openai_base + "/chat/completions",
                                json={"model": "gpt-test", "stream": True, "messages": []}) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {") and "first_event" not in marks:
                    marks["first_event"] = loop.time()
                if line.startswith(b"data: [DONE]"):
                    marks["done"] = loop.time()
    assert marks["first_event"] < marks["settle_start"]  # streaming was not held back
    assert marks["done"] >= marks["settle_end"]          # but the end was, until settled


@pytest.mark.parametrize(
    ("raw", "alias", "new", "inject", "expected"),
    [
        (b'{"model": "a", "x": 1}', "a", "b", False, {"model": "b", "x": 1}),
        (b'{"model":"a","stream":true}', "a", "b", True,
         {"model": "b", "stream": True, "stream_options": {"include_usage": True}}),
        (b'{"model":"a","stream":true}\n', "a", None, True,
         {"model": "a", "stream": True, "stream_options": {"include_usage": True}}),
    ],
)
def test_patched_bodies_are_the_json_the_upstream_should_get(raw, alias, new, inject, expected) -> None:
    from nexgate_proxy.proxy import _patch_raw

    assert json.loads(_patch_raw(raw, alias, new, inject)) == expected


@pytest.mark.parametrize("raw", [
    b'{"model": "a", "tools": [{"model": "a"}]}',      # "model" twice: not safe to patch
    b'{"model": "\\u0061"}',                             # escaped differently than json.dumps would
])
def test_unsafe_bodies_are_not_patched(raw: bytes) -> None:
    from nexgate_proxy.proxy import _patch_raw

    assert _patch_raw(raw, "a", "b", False) is None
