from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator, Callable

import pytest

from nexgate_proxy.state.bus import EVICT_ALL, MemoryBus, RedisBus, open_bus
from nexgate_proxy.state.redis import encode_command, open_resp, parse_redis_url


class Recorder:
    """A subscriber that remembers messages and lets a test wait for one."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, kind: str, value: str) -> None:
        self.messages.append((kind, value))
        self._changed.set()

    def real(self) -> list[tuple[str, str]]:
        return [m for m in self.messages if m[0] != EVICT_ALL]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s; got {self.messages}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass


# --- memory ------------------------------------------------------------------------------------


async def test_memory_bus_delivers_to_every_subscriber() -> None:
    bus = open_bus("memory://")
    assert isinstance(bus, MemoryBus)
    first, second = Recorder(), Recorder()
    bus.subscribe(first)
    unsubscribe = bus.subscribe(second)
    await bus.start()
    assert await bus.publish("api_key", "abc123") is True
    unsubscribe()
    unsubscribe()  # idempotent
    assert await bus.publish("user", "u1") is True
    await bus.close()
    assert first.messages == [("api_key", "abc123"), ("user", "u1")]
    assert second.messages == [("api_key", "abc123")]


async def test_a_failing_subscriber_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    bus = MemoryBus()

    def broken(kind: str, value: str) -> None:
        raise RuntimeError("boom")

    recorder = Recorder()
    bus.subscribe(broken)
    bus.subscribe(recorder)
    assert await bus.publish("api_key", "k") is True
    assert recorder.messages == [("api_key", "k")]
    assert "subscriber failed" in caplog.text


async def test_invalid_messages_are_programming_errors() -> None:
    bus = MemoryBus()
    with pytest.raises(ValueError):
        await bus.publish("", "x")
    with pytest.raises(ValueError):
        await bus.publish("api_key", None)  # type: ignore[arg-type]


def test_open_bus_picks_backend_by_scheme() -> None:
    assert isinstance(open_bus("memory://"), MemoryBus)
    assert isinstance(open_bus("redis://127.0.0.1:6379/0"), RedisBus)
    rediss = open_bus("rediss://cache.example.com:6380", channel="custom")
    assert isinstance(rediss, RedisBus) and rediss.channel == "custom"
    assert isinstance(open_bus("unix:///run/redis/redis.sock?db=2"), RedisBus)
    with pytest.raises(ValueError):
        open_bus("kafka://broker")
    with pytest.raises(ValueError):
        open_bus("memory://", channel="x")


# --- redis -------------------------------------------------------------------------------------


@pytest.fixture
def channel() -> str:
    # Pub/sub channels ignore the db number: isolate parallel test runs by name.
    return f"nexgate:test:invalidate:{uuid.uuid4().hex}"


@pytest.fixture
async def make_bus(redis_url: str, channel: str) -> AsyncIterator[Callable[..., RedisBus]]:
    buses: list[RedisBus] = []

    def make(**options: object) -> RedisBus:
        options.setdefault("channel", channel)
        options.setdefault("client_name", f"nexgate-test-{uuid.uuid4().hex}")
        bus = RedisBus(redis_url, **options)  # type: ignore[arg-type]
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


@pytest.mark.redis
async def test_publish_on_one_instance_reaches_the_other_within_a_second(make_bus: Callable[..., RedisBus]) -> None:
    instance_a, instance_b = make_bus(), make_bus()
    on_a, on_b = Recorder(), Recorder()
    instance_a.subscribe(on_a)
    instance_b.subscribe(on_b)
    await instance_a.start()
    await instance_b.start()
    assert instance_a.connected and instance_b.connected

    started = time.monotonic()
    assert await instance_a.publish("api_key", "pub_123") is True
    await on_b.wait_for(lambda: ("api_key", "pub_123") in on_b.messages, timeout=1.0)
    assert time.monotonic() - started < 1.0

    assert await instance_b.publish("user", "user_9") is True
    await on_a.wait_for(lambda: ("user", "user_9") in on_a.messages, timeout=1.0)

    await asyncio.sleep(0.2)  # give any duplicate echo time to show up
    # Each instance sees each message exactly once, its own included.
    assert on_a.real() == [("api_key", "pub_123"), ("user", "user_9")]
    assert on_b.real() == [("api_key", "pub_123"), ("user", "user_9")]


@pytest.mark.redis
async def test_own_messages_are_delivered_locally_at_once(make_bus: Callable[..., RedisBus]) -> None:
    bus = make_bus()
    recorder = Recorder()
    bus.subscribe(recorder)
    await bus.start()
    assert await bus.publish("api_key", "mine") is True
    assert recorder.real() == [("api_key", "mine")]  # before any round-trip to Redis


@pytest.mark.redis
async def test_subscribing_announces_evict_all(make_bus: Callable[..., RedisBus]) -> None:
    bus = make_bus()
    recorder = Recorder()
    bus.subscribe(recorder)
    await bus.start()
    assert recorder.messages == [(EVICT_ALL, "")]


@pytest.mark.redis
async def test_malformed_messages_on_the_channel_are_ignored(
    make_bus: Callable[..., RedisBus], redis_url: str, channel: str
) -> None:
    bus = make_bus()
    recorder = Recorder()
    bus.subscribe(recorder)
    await bus.start()
    raw = await open_resp(parse_redis_url(redis_url))
    try:
        for junk in [b"not json", b"[]", b'{"o":"x","k":"","v":"y"}', b'{"o":"x","k":"a","v":1}', b"\xff" * 10]:
            await raw.call(encode_command("PUBLISH", channel, junk))
        await raw.call(encode_command("PUBLISH", channel, b'{"o":"someone-else","k":"api_key","v":"ok"}'))
    finally:
        raw.abort()
    await recorder.wait_for(lambda: bool(recorder.real()))
    assert recorder.real() == [("api_key", "ok")]
    assert bus.connected


async def client_list(redis_url: str) -> list[dict[str, str]]:
    """Redis's CLIENT LIST, one dict of fields per connection."""
    admin = await open_resp(parse_redis_url(redis_url))
    try:
        listing = await admin.call(encode_command("CLIENT", "LIST"))
    finally:
        admin.abort()
    assert isinstance(listing, bytes)
    return [dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
            for line in listing.decode().splitlines()]


async def _kill_connections(redis_url: str, client_name: str) -> int:
    victims = [c["id"] for c in await client_list(redis_url) if c.get("name") == client_name]
    admin = await open_resp(parse_redis_url(redis_url))
    try:
        for client_id in victims:
            await admin.call(encode_command("CLIENT", "KILL", "ID", client_id))
    finally:
        admin.abort()
    return len(victims)


@pytest.mark.redis
async def test_reconnects_by_itself_after_losing_redis(make_bus: Callable[..., RedisBus], redis_url: str) -> None:
    listener, publisher = make_bus(), make_bus()
    received = Recorder()
    listener.subscribe(received)
    await listener.start()
    await publisher.start()
    assert await publisher.publish("api_key", "before") is True
    await received.wait_for(lambda: ("api_key", "before") in received.messages)
    received.messages.clear()

    # What a Redis restart looks like to the client: the server drops every connection.
    assert await _kill_connections(redis_url, listener.client_name) >= 1
    assert await _kill_connections(redis_url, publisher.client_name) >= 1

    # Messages may have been missed while down, so the listener tells subscribers to drop everything.
    await received.wait_for(lambda: (EVICT_ALL, "") in received.messages, timeout=3.0)
    assert listener.connected
    # The publisher's pooled connection died too; publish recovers without raising.
    assert await publisher.publish("api_key", "after") is True
    await received.wait_for(lambda: ("api_key", "after") in received.messages, timeout=1.0)


@pytest.mark.redis
async def test_revocation_fanout_under_load(make_bus: Callable[..., RedisBus]) -> None:
    instances = [make_bus() for _ in range(3)]
    recorders = [Recorder() for _ in instances]
    for bus, recorder in zip(instances, recorders):
        bus.subscribe(recorder)
        await bus.start()
    values = [f"key_{i}" for i in range(100)]
    results = await asyncio.gather(*(instances[i % 3].publish("api_key", v) for i, v in enumerate(values)))
    assert all(results)
    for recorder in recorders:
        await recorder.wait_for(lambda r=recorder: len(r.real()) == len(values), timeout=1.0)
        assert sorted(v for _, v in recorder.real()) == sorted(values)


# --- redis unavailable: the gateway keeps running ------------------------------------------------


async def test_unreachable_redis_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    # Port 1 refuses connections at once; nothing listens there.
    bus = RedisBus("redis://127.0.0.1:1/0", channel="nexgate:test:down", connect_timeout=0.3, publish_timeout=0.2)
    recorder = Recorder()
    bus.subscribe(recorder)
    started = time.monotonic()
    await bus.start()
    assert time.monotonic() - started < 1.0
    assert not bus.connected

    started = time.monotonic()
    assert await bus.publish("api_key", "k") is False
    assert time.monotonic() - started < 0.5
    # The local instance still evicts even though Redis is down.
    assert recorder.messages == [("api_key", "k")]
    await bus.close()
    assert "invalidation bus lost Redis" in caplog.text
    assert "invalidation publish to Redis failed" in caplog.text


async def test_publish_times_out_on_a_silent_server() -> None:
    # A server that accepts TCP but never answers: publish must give up within its timeout.
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(-1)
        finally:
            writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bus = RedisBus(f"redis://127.0.0.1:{port}/0", connect_timeout=0.2, publish_timeout=0.2)
    try:
        await bus.start()
        assert not bus.connected
        started = time.monotonic()
        assert await bus.publish("api_key", "k") is False
        assert time.monotonic() - started < 0.6
    finally:
        await bus.close()
        server.close()
        await server.wait_closed()


async def test_publish_before_start_delivers_locally_and_reports_false() -> None:
    bus = RedisBus("redis://127.0.0.1:1/0")
    recorder = Recorder()
    bus.subscribe(recorder)
    assert await bus.publish("api_key", "k") is False
    assert recorder.messages == [("api_key", "k")]
    await bus.close()
