"""The hot counters behind rate limiting, on both backends: memory and real Redis."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import AsyncIterator

import pytest

from nexgate_plugins.ratelimit.counters import (
    BANNED,
    CONCURRENCY,
    REQUESTS,
    TOKENS,
    BruteForce,
    Check,
    Counters,
    MemoryCounters,
    RedisCounters,
    Release,
    open_counters,
)
from nexgate_proxy.state.redis import StateUnavailable, parse_redis_url
from nexgate_proxy.testing import free_port, require_redis


def member() -> str:
    return "req_" + secrets.token_hex(12)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def counters(request: pytest.FixtureRequest) -> AsyncIterator[Counters]:
    if request.param == "memory":
        backend: Counters = MemoryCounters()
    else:
        backend = RedisCounters(require_redis(), prefix=f"test:rl:{secrets.token_hex(6)}", timeout=0.5)
    await backend.start()
    yield backend
    await backend.close()


def redis_pair(prefix: str, **options) -> tuple[RedisCounters, RedisCounters]:
    url = require_redis()
    return RedisCounters(url, prefix=prefix, **options), RedisCounters(url, prefix=prefix, **options)


async def test_requests_sliding_window_is_exact_at_the_edges(counters: Counters) -> None:
    window = 400
    check = Check(REQUESTS, "key:edge", 3, window_ms=window)
    started = time.monotonic()
    for _ in range(2):
        assert (await counters.acquire(member(), [check])).allowed
    await asyncio.sleep(0.25)
    third = await counters.acquire(member(), [check])
    assert third.allowed and third.remaining == [0]
    assert 0 < third.reset_ms[0] <= window - 200
    refused = await counters.acquire(member(), [check])
    assert not refused.allowed and refused.refused == 0
    assert 0 < refused.retry_ms <= window - 200  # until the first entry leaves
    # Just past the first two entries' window: exactly two slots, not a fresh window of three.
    await asyncio.sleep(max(0.0, started + 0.43 - time.monotonic()))
    results = [(await counters.acquire(member(), [check])).allowed for _ in range(3)]
    assert results == [True, True, False]


async def test_all_or_nothing(counters: Counters) -> None:
    wide = Check(REQUESTS, "ip:192.0.2.1", 5)
    narrow = Check(REQUESTS, "key:narrow", 1)
    first = await counters.acquire(member(), [wide, narrow])
    assert first.allowed and first.remaining == [4, 0]
    second = await counters.acquire(member(), [wide, narrow])
    assert not second.allowed and second.refused == 1
    # The refusal took nothing from the wide limit.
    third = await counters.acquire(member(), [wide])
    assert third.allowed and third.remaining == [3]


async def test_tokens_are_reserved_then_corrected_to_usage(counters: Counters) -> None:
    tpm = Check(TOKENS, "key:tpm", 100, amount=60)
    a = member()
    assert (await counters.acquire(a, [tpm])).remaining == [40]
    refused = await counters.acquire(member(), [tpm])
    assert not refused.allowed and 0 < refused.retry_ms <= 60_000
    await counters.settle(a, [Release(TOKENS, "key:tpm", reserved=60, actual=10)])
    again = await counters.acquire(member(), [tpm])
    assert again.allowed and again.remaining == [30]
    # A correction upwards counts too.
    b = member()
    small = Check(TOKENS, "key:tpm2", 100, amount=5)
    await counters.acquire(b, [small])
    await counters.settle(b, [Release(TOKENS, "key:tpm2", reserved=5, actual=90)])
    assert (await counters.acquire(member(), [small])).remaining == [5]
    assert not (await counters.acquire(member(), [Check(TOKENS, "key:tpm2", 100, amount=6)])).allowed


async def test_token_window_frees_reservations(counters: Counters) -> None:
    tpm = Check(TOKENS, "key:tpmw", 100, amount=70, window_ms=300)
    assert (await counters.acquire(member(), [tpm])).allowed
    refused = await counters.acquire(member(), [tpm])
    assert not refused.allowed and refused.retry_ms <= 300
    await asyncio.sleep(0.32)
    assert (await counters.acquire(member(), [tpm])).remaining == [30]


async def test_concurrency_slots(counters: Counters) -> None:
    slot = Check(CONCURRENCY, "key:conc", 2, window_ms=60_000)
    a, b = member(), member()
    assert (await counters.acquire(a, [slot])).allowed
    assert (await counters.acquire(b, [slot])).remaining == [0]
    refused = await counters.acquire(member(), [slot])
    assert not refused.allowed and refused.retry_ms > 0
    await counters.settle(a, [Release(CONCURRENCY, "key:conc")])
    assert (await counters.acquire(member(), [slot])).allowed


async def test_failed_authentications_ban_the_ip(counters: Counters) -> None:
    policy = BruteForce(max_failures=3, max_key_failures=0, window_ms=60_000, ban_ms=5_000)
    for i in range(2):
        noted = await counters.note(member(), None, "ip:198.51.100.1", policy, "kid:abc")
        assert noted.ban_ms == 0 and not noted.new_ban
    noted = await counters.note(member(), None, "ip:198.51.100.1", policy, "kid:abc")
    assert noted.new_ban and 4_000 < noted.ban_ms <= 5_000
    banned = await counters.acquire(member(), [Check(REQUESTS, "key:x", 100)], ban_subject="ip:198.51.100.1")
    assert not banned.allowed and banned.refused == BANNED and banned.retry_ms > 4_000
    # Another IP is not affected; a note without a failure still reports the ban.
    assert (await counters.acquire(member(), [], ban_subject="ip:198.51.100.2")).allowed
    assert (await counters.note(member(), None, "ip:198.51.100.1")).ban_ms > 0


async def test_many_ips_failing_on_one_key_id_get_banned(counters: Counters) -> None:
    policy = BruteForce(max_failures=100, max_key_failures=3, window_ms=60_000, ban_ms=5_000)
    results = [await counters.note(member(), None, f"ip:203.0.113.{i}", policy, "kid:target") for i in range(5)]
    assert [r.new_ban for r in results] == [False, False, True, True, True]
    other = await counters.note(member(), None, "ip:203.0.113.99", policy, "kid:other")
    assert not other.new_ban


async def test_ip_rate_counts_requests_that_never_reached_acquire(counters: Counters) -> None:
    ip = Check(REQUESTS, "ip:192.0.2.50", 2)
    assert (await counters.note(member(), ip, "ip:192.0.2.50")).block_ms == 0
    blocked = await counters.note(member(), ip, "ip:192.0.2.50")
    assert 59_000 < blocked.block_ms <= 60_000
    assert not (await counters.acquire(member(), [ip])).allowed
    # Past the limit nothing more is stored: the block ends when the window frees a slot.
    assert (await counters.note(member(), ip, "ip:192.0.2.50")).block_ms <= blocked.block_ms


def test_memory_sweep_forgets_idle_subjects() -> None:
    now = [1000.0]
    counters = MemoryCounters(clock=lambda: now[0], sweep_interval=0)
    counters.acquire_now(member(), [Check(REQUESTS, "ip:a", 5, window_ms=1000),
                                    Check(TOKENS, "key:t", 50, 10, window_ms=1000)])
    asyncio.run(counters.note(member(), None, "ip:a", BruteForce(5, 0, 1000, 1000)))
    assert len(counters) == 3
    now[0] += 2
    counters.sweep()
    assert len(counters) == 0


# ---------------------------------------------------------------- redis only


@pytest.mark.redis
async def test_two_instances_share_limits_exactly() -> None:
    first, second = redis_pair(f"test:rl:{secrets.token_hex(6)}", timeout=1.0)
    await first.start()
    await second.start()
    try:
        check = [Check(REQUESTS, "key:shared", 50), Check(CONCURRENCY, "key:shared", 1000)]
        results = await asyncio.gather(*[(first if i % 2 else second).acquire(member(), check) for i in range(300)])
        assert sum(r.allowed for r in results) == 50
    finally:
        await first.close()
        await second.close()


_COMMAND = re.compile(rb"\*\d+\r\n\$\d+\r\n([A-Z]+)\r\n")


def wire_commands(counters: RedisCounters) -> list[str]:
    """Record the name of every command written to the counters' Redis connection from now on."""
    assert counters.redis._conn is not None and counters.redis._conn.transport is not None
    transport = counters.redis._conn.transport
    seen: list[str] = []
    original = transport.write

    def write(data: bytes) -> None:
        seen.extend(name.decode() for name in _COMMAND.findall(bytes(data)))
        original(data)

    transport.write = write  # type: ignore[method-assign]
    return seen


@pytest.mark.redis
async def test_one_round_trip_per_call() -> None:
    counters = RedisCounters(require_redis(), prefix=f"test:rl:{secrets.token_hex(6)}", timeout=1.0)
    await counters.start()
    calls = wire_commands(counters)
    try:
        checks = [Check(REQUESTS, "ip:192.0.2.9", 100), Check(REQUESTS, "key:k", 100),
                  Check(REQUESTS, "org:o", 100), Check(TOKENS, "key:k", 1000, 50),
                  Check(TOKENS, "org:o", 1000, 50), Check(CONCURRENCY, "key:k", 10)]
        m = member()
        assert (await counters.acquire(m, checks, ban_subject="ip:192.0.2.9")).allowed
        await counters.settle(m, [Release(TOKENS, "key:k", 50, 20), Release(TOKENS, "org:o", 50, 20),
                                  Release(CONCURRENCY, "key:k")])
        assert calls == ["EVALSHA", "EVALSHA"] and counters.round_trips == 2
        # Concurrent calls share writes on the one connection; each is still one request and one reply.
        await asyncio.gather(*[counters.acquire(member(), checks[:2]) for _ in range(50)])
        assert calls.count("EVALSHA") == 52
    finally:
        await counters.close()


@pytest.mark.redis
async def test_a_late_reply_is_skipped_and_the_connection_stays_in_step() -> None:
    counters = RedisCounters(require_redis(), prefix=f"test:rl:{secrets.token_hex(6)}", timeout=0.03)
    await counters.start()
    conn = counters.redis._conn
    assert conn is not None
    deliver = conn.data_received
    loop = asyncio.get_running_loop()
    conn.data_received = lambda data: loop.call_later(0.1, deliver, data)  # type: ignore[method-assign]
    try:
        check = [Check(REQUESTS, "key:late", 10)]
        with pytest.raises(StateUnavailable):
            await counters.acquire(member(), check)
        await asyncio.sleep(0.15)  # the late reply arrives with nobody waiting for it
        conn.data_received = deliver  # type: ignore[method-assign]
        second = await counters.acquire(member(), check)
        # Its own reply, not the stale one: the timed-out call was still counted by Redis.
        assert second.allowed and second.remaining == [8]
        assert counters.redis._conn is conn and not counters.breaker.open
    finally:
        await counters.close()


@pytest.mark.redis
async def test_a_restarted_redis_loses_its_scripts_and_gets_them_back() -> None:
    counters = RedisCounters(require_redis(), prefix=f"test:rl:{secrets.token_hex(6)}", timeout=1.0)
    await counters.start()
    try:
        counters._scripts["acquire"] = (counters._scripts["acquire"][0], "0" * 40)  # as if flushed
        assert (await counters.acquire(member(), [Check(REQUESTS, "key:reload", 5)])).allowed
    finally:
        await counters.close()


def test_redis_urls() -> None:
    assert parse_redis_url("redis://127.0.0.1:6379/15").db == 15
    auth = parse_redis_url("redis://user:p%40ss@cache:6380/2")
    assert (auth.host, auth.port, auth.db, auth.username, auth.password) == ("cache", 6380, 2, "user", "p@ss")
    assert parse_redis_url("rediss://cache").tls and not parse_redis_url("rediss://c?ssl_cert_reqs=none").verify_tls
    sock = parse_redis_url("unix:///run/redis.sock?db=3")
    assert (sock.path, sock.db) == ("/run/redis.sock", 3)
    with pytest.raises(ValueError, match="number"):
        parse_redis_url("redis://cache/zero")


@pytest.mark.redis
async def test_a_dead_instances_slots_free_after_the_lease() -> None:
    prefix = f"test:rl:{secrets.token_hex(6)}"
    crashed, survivor = redis_pair(prefix, timeout=1.0, lease_renew_interval=0.05)
    await crashed.start()
    await survivor.start()
    try:
        slot = Check(CONCURRENCY, "key:lease", 1, window_ms=300)
        assert (await crashed.acquire(member(), [slot])).allowed
        await asyncio.sleep(0.5)  # renewed in the background while "in flight"
        assert not (await survivor.acquire(member(), [slot])).allowed
        await crashed.close()  # dies without settling
        await asyncio.sleep(0.35)
        assert (await survivor.acquire(member(), [slot])).allowed
    finally:
        await survivor.close()


async def _assert_fast_failures(counters: RedisCounters, first_call_limit: float) -> None:
    check = [Check(REQUESTS, "key:x", 10)]
    for _ in range(counters.breaker.threshold):
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            await counters.acquire(member(), check)
        assert time.monotonic() - started < first_call_limit
    assert counters.breaker.open
    started = time.monotonic()
    for _ in range(1000):
        with pytest.raises(StateUnavailable):
            await counters.acquire(member(), check)
    assert time.monotonic() - started < 0.1  # an open circuit costs no I/O


async def test_refused_connections_open_the_circuit() -> None:
    counters = RedisCounters(f"redis://127.0.0.1:{free_port()}/0", timeout=0.1)
    await counters.start()
    try:
        await _assert_fast_failures(counters, 0.2)
    finally:
        await counters.close()


async def test_a_silent_server_costs_one_timeout_not_a_hang() -> None:
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    counters = RedisCounters(f"redis://127.0.0.1:{port}/0", timeout=0.08)
    try:
        started = time.monotonic()
        await counters.start()  # loading the scripts fails too, within its own bound
        assert time.monotonic() - started < 1.5
        counters.breaker.close()
        await _assert_fast_failures(counters, 0.3)
    finally:
        await counters.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def test_open_counters_by_url() -> None:
    assert isinstance(open_counters("memory://"), MemoryCounters)
    assert isinstance(open_counters("redis://127.0.0.1:6379/0"), RedisCounters)
    with pytest.raises(ValueError, match="unsupported"):
        open_counters("mysql://x")


# ------------------------------------------------------- settles travel in batches


async def test_a_settle_not_waited_for_is_seen_by_the_next_call(counters: Counters) -> None:
    slot = Check(CONCURRENCY, "key:soon", 1)
    tokens = Check(TOKENS, "key:soon", 100, amount=80)
    a = member()
    assert (await counters.acquire(a, [slot, tokens])).allowed
    counters.settle_soon(a, [Release(TOKENS, "key:soon", 80, 30), Release(CONCURRENCY, "key:soon")])
    # No await in between: the next call still finds the slot free and the reservation corrected.
    after = await counters.acquire(member(), [slot, Check(TOKENS, "key:soon", 100, amount=10)])
    assert after.allowed and after.remaining == [0, 60]


@pytest.mark.redis
async def test_settles_of_one_loop_iteration_share_one_round_trip() -> None:
    counters = RedisCounters(require_redis(), prefix=f"test:rl:{secrets.token_hex(6)}", timeout=1.0)
    await counters.start()
    calls = wire_commands(counters)
    try:
        members = [member() for _ in range(30)]
        checks = [Check(TOKENS, "key:batch", 3000, amount=100), Check(CONCURRENCY, "key:batch", 30)]
        await asyncio.gather(*[counters.acquire(m, checks) for m in members])
        assert not (await counters.acquire(member(), checks)).allowed  # every slot taken
        calls.clear()
        for m in members:
            counters.settle_soon(m, [Release(TOKENS, "key:batch", 100, 40), Release(CONCURRENCY, "key:batch")])
        after = await counters.acquire(member(), checks)
        # 30 requests' releases in one EVALSHA, then the acquire: every slot free, every reservation corrected.
        assert calls == ["EVALSHA", "EVALSHA"]
        assert after.allowed and after.remaining == [3000 - 30 * 40 - 100, 29]
    finally:
        await counters.close()


@pytest.mark.redis
async def test_close_sends_the_settles_still_waiting() -> None:
    prefix = f"test:rl:{secrets.token_hex(6)}"
    leaving, staying = redis_pair(prefix, timeout=1.0)
    await leaving.start()
    await staying.start()
    try:
        slot = Check(CONCURRENCY, "key:closing", 1)
        m = member()
        assert (await leaving.acquire(m, [slot])).allowed
        leaving.settle_soon(m, [Release(CONCURRENCY, "key:closing")])
        await leaving.close()  # shutdown: the release goes out before the connection closes
        assert (await staying.acquire(member(), [slot])).allowed
    finally:
        await staying.close()


@pytest.mark.redis
async def test_a_settle_that_times_out_counts_as_a_failure_and_the_connection_stays_in_step() -> None:
    counters = RedisCounters(require_redis(), prefix=f"test:rl:{secrets.token_hex(6)}", timeout=0.05)
    await counters.start()
    conn = counters.redis._conn
    assert conn is not None
    try:
        slot = Check(CONCURRENCY, "key:slow", 2)
        a = member()
        assert (await counters.acquire(a, [slot])).allowed
        deliver = conn.data_received
        loop = asyncio.get_running_loop()
        conn.data_received = lambda data: loop.call_later(0.1, deliver, data)  # type: ignore[method-assign]
        with pytest.raises(StateUnavailable):
            await counters.settle(a, [Release(CONCURRENCY, "key:slow")])
        assert counters.failures == 1 and not counters.breaker.open
        await asyncio.sleep(0.15)  # the late reply arrives with nobody waiting for it
        conn.data_received = deliver  # type: ignore[method-assign]
        # Redis did free the slot; the next call gets its own reply, not the stale one.
        assert (await counters.acquire(member(), [slot])).remaining == [1]
        assert counters.redis._conn is conn
    finally:
        await counters.close()


async def test_an_open_circuit_refuses_a_settle_at_once() -> None:
    counters = RedisCounters(f"redis://127.0.0.1:{free_port()}/0", timeout=0.05)
    counters.breaker.open = True
    with pytest.raises(StateUnavailable):
        counters.settle_soon(member(), [Release(CONCURRENCY, "key:x")])
    await counters.close()


class _NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def abort(self) -> None:
        pass


async def test_replies_split_anywhere_resolve_in_order_and_garbage_closes_the_connection() -> None:
    from nexgate_proxy.state.redis import RespError, _RespProtocol

    protocol = _RespProtocol()
    protocol.connection_made(_NullTransport())  # type: ignore[arg-type]
    first, second, third = (protocol.call(b"x") for _ in range(3))
    replies = b"*3\r\n:1\r\n:-7\r\n$3\r\nabc\r\n-NOSCRIPT No matching script\r\n:42\r\n"
    for i in range(len(replies)):  # one byte at a time: every split point
        protocol.data_received(replies[i:i + 1])
    assert first.result() == [1, -7, b"abc"] and third.result() == 42
    assert isinstance(second.exception(), RespError) and str(second.exception()).startswith("NOSCRIPT")

    pending = protocol.call(b"y")
    protocol.data_received(b"?not RESP\r\n")
    assert protocol.closed and isinstance(pending.exception(), ConnectionError)

    spoken_to = _RespProtocol()
    spoken_to.connection_made(_NullTransport())  # type: ignore[arg-type]
    spoken_to.data_received(b":1\r\n")  # a reply nobody asked for: the stream is out of step
    assert spoken_to.closed
