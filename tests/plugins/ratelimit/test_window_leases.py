"""Window leases (nexgate_plugins.ratelimit.counters.leases): limits admitted in process from room leased in Redis.

Real Redis; every test under its own key prefix. Two RedisCounters objects with their own
connections stand for two gateway instances.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import AsyncIterator

import pytest

from nexgate_plugins.ratelimit.counters import (
    LEASE_SPAN_MS,
    REQUESTS,
    TOKENS,
    Check,
    Decision,
    RedisCounters,
    Release,
)
from nexgate_proxy.state.redis import encode_command, open_resp, parse_redis_url
from nexgate_proxy.testing import require_redis

pytestmark = pytest.mark.redis


@pytest.fixture
async def pair() -> AsyncIterator[tuple[RedisCounters, RedisCounters]]:
    prefix = f"test:wl:{secrets.token_hex(6)}"
    first, second = (RedisCounters(require_redis(), prefix=prefix, timeout=2.0) for _ in range(2))
    await first.start()
    await second.start()
    yield first, second
    await first.close()
    await second.close()


def member() -> str:
    return "req_" + secrets.token_hex(12)


async def admit(counters: RedisCounters, who: str, checks: list[Check]) -> Decision:
    """What the rate limiter does: in process when a lease has room, else one round trip."""
    left = counters.admit_locally(who, checks)
    if left is not None:
        return Decision(True, -1, 0, *left)
    return await counters.acquire(who, checks)


async def command(*args: object) -> object:
    conn = await open_resp(parse_redis_url(require_redis()))
    try:
        return await conn.call(encode_command(*args))
    finally:
        conn.abort()


async def log_of(counters: RedisCounters, kind: str, subject: str) -> list[tuple[str, float]]:
    flat = await command("ZRANGE", counters.key(kind, subject), 0, -1, "WITHSCORES")
    return [(flat[i].decode(), float(flat[i + 1])) for i in range(0, len(flat), 2)]


async def test_two_instances_with_leases_admit_exactly_the_limit(pair) -> None:
    first, second = pair
    checks = [Check(REQUESTS, "key:busy", 3200)]  # leases of 100 entries
    admitted = 0
    for start in range(0, 4000, 40):
        results = await asyncio.gather(*[admit(first if i % 2 else second, member(), checks)
                                         for i in range(start, start + 40)])
        admitted += sum(r.allowed for r in results)
    assert admitted == 3200
    # The first half came mostly from leases; past half the limit every request asks Redis (1600
    # admitted, 800 refused), so the round trips are 2400 plus a few hundred.
    assert 2400 < first.round_trips + second.round_trips < 3000
    # Every lease's unused entries went back; the log holds exactly what was admitted.
    await first.end_window_leases(closing=True)
    await second.end_window_leases(closing=True)
    assert len(await log_of(first, REQUESTS, "key:busy")) == 3200


async def test_leased_entries_are_timestamped_a_span_ahead_and_unused_ones_go_back(pair) -> None:
    first, _ = pair
    checks = [Check(REQUESTS, "key:a", 3200)]
    before = await redis_now_ms(first)
    assert (await first.acquire(member(), checks)).allowed  # the first request of a span: no lease
    assert not first.window_leases.active
    assert (await first.acquire(member(), checks)).allowed  # the second: a limit's first lease, 16 entries
    for _ in range(3):  # (a quarter used would ask for the next one)
        assert first.admit_locally(member(), checks) is not None  # no round trip
    log = await log_of(first, REQUESTS, "key:a")
    leased = [score for name, score in log if name.startswith("L:")]
    assert len(log) == 2 + 16 and len(leased) == 16
    # Counted no earlier than any request using them can come: exact at the window's edges.
    assert min(leased) >= before + LEASE_SPAN_MS
    await asyncio.sleep(LEASE_SPAN_MS / 1000 + 0.4)  # the span ends; the keeper gives back the rest
    assert first.admit_locally(member(), checks) is None
    assert len(await log_of(first, REQUESTS, "key:a")) == 2 + 3


async def test_a_large_lease_goes_in_and_out_of_redis_in_bulk(pair) -> None:
    # 4096 entries: more than one variadic ZADD / ZREM (a thousand entries each) in the scripts.
    first, _ = pair
    checks = [Check(REQUESTS, "key:bulk", 10**6)]
    assert (await first.acquire(member(), checks)).allowed
    first.window_leases.scale[(REQUESTS, "key:bulk")] = 4096  # as a busy limit's lease grows to
    assert (await first.acquire(member(), checks)).allowed
    for _ in range(10):
        assert first.admit_locally(member(), checks) is not None
    log = await log_of(first, REQUESTS, "key:bulk")
    leased = {name for name, _ in log if name.startswith("L:")}
    assert len(log) == 2 + 4096 and len(leased) == 4096
    await first.end_window_leases(closing=True)
    assert len(await log_of(first, REQUESTS, "key:bulk")) == 2 + 10  # the 4086 unused ones went back


async def test_a_quiet_limit_leases_nothing(pair) -> None:
    first, _ = pair
    checks = [Check(REQUESTS, "key:quiet", 3200)]
    for _ in range(3):
        assert (await first.acquire(member(), checks)).allowed
        assert not first.window_leases.active
        first.window_leases.seen.clear()  # as if a span had passed since the last request
    assert len(await log_of(first, REQUESTS, "key:quiet")) == 3


async def test_the_next_lease_is_asked_for_ahead_so_no_request_waits(pair) -> None:
    first, _ = pair
    checks = [Check(REQUESTS, "key:steady", 10**6), Check(TOKENS, "key:steady", 10**9, 300)]
    waited = 0
    for _ in range(1000):
        who = member()
        if first.admit_locally(who, checks) is None:
            waited += 1
            assert (await first.acquire(who, checks)).allowed
        first.settle_soon(who, [Release(TOKENS, "key:steady", 300, 25)])
        await asyncio.sleep(0.0003)  # requests come one after another; the asks ahead go out meanwhile
    # The first two requests ask Redis and wait (the second leases). While the leases are still small (16, 32, ... requests'
    # worth), an ask ahead may come after the lease is spent and a request then asks itself; once
    # they have grown, none does. (Leased one by one, all 1000 would ask.)
    assert 2 <= waited <= 11
    # Leases double from 16 requests' worth while a quarter goes before their end: few asks.
    assert first.round_trips <= 30
    await first.end_window_leases(closing=True)
    assert len(await log_of(first, REQUESTS, "key:steady")) == 1000
    assert int(await command("GET", first.key("ts", "key:steady"))) == 1000 * 25


async def test_no_lease_past_half_the_limit_so_the_last_requests_are_decided_one_by_one(pair) -> None:
    first, second = pair
    checks = [Check(REQUESTS, "key:half", 128)]  # leases of 4
    for _ in range(70):
        await first.acquire(member(), checks)  # 70 + leases until more than half is used
    await first.end_window_leases(closing=True)
    used = len(await log_of(first, REQUESTS, "key:half"))
    assert 64 <= used <= 70
    assert (await second.acquire(member(), checks)).allowed
    assert not second.window_leases.active  # more than half used: nothing leased
    results = [await admit(second, member(), checks) for _ in range(100)]
    assert sum(r.allowed for r in results) == 128 - used - 1


async def test_token_leases_settle_to_real_usage(pair) -> None:
    first, _ = pair
    tpm = 1_000_000
    checks = [Check(TOKENS, "key:t", tpm, 500)]
    served = []
    for _ in range(10):
        who = member()
        decision = await admit(first, who, checks)
        assert decision.allowed
        served.append(who)
    # Two admits went to Redis, the second leasing 500 * 16 tokens; eight came from the lease.
    assert first.round_trips == 2
    for who in served:
        first.settle_soon(who, [Release(TOKENS, "key:t", 500, 20)])
    await asyncio.sleep(LEASE_SPAN_MS / 1000 + 0.4)
    log = await log_of(first, TOKENS, "key:t")
    amounts = sorted(int(name.rsplit(":", 1)[1]) for name, _ in log)
    # The first two requests' own entries (settled through the batch) and the lease, rewritten to
    # its usage (a lease asked ahead and not used is gone).
    assert amounts == [20, 20, 8 * 20]
    total = await command("GET", first.key("ts", "key:t"))
    assert int(total) == 10 * 20


async def test_an_open_request_keeps_its_estimate_until_it_settles(pair) -> None:
    first, _ = pair
    checks = [Check(TOKENS, "key:open", 1_000_000, 500)]
    for _ in range(2):  # the second leases
        who = member()
        assert (await first.acquire(who, checks)).allowed
        first.settle_soon(who, [Release(TOKENS, "key:open", 500, 500)])
    late = member()
    assert first.admit_locally(late, checks) is not None
    await asyncio.sleep(LEASE_SPAN_MS / 1000 + 0.4)
    entries = [name for name, _ in await log_of(first, TOKENS, "key:open") if name.startswith("L:")]
    assert [int(e.rsplit(":", 1)[1]) for e in entries] == [500]  # open: its estimate
    first.settle_soon(late, [Release(TOKENS, "key:open", 500, 30)])
    await asyncio.sleep(0.4)
    entries = [name for name, _ in await log_of(first, TOKENS, "key:open") if name.startswith("L:")]
    assert [int(e.rsplit(":", 1)[1]) for e in entries] == [30]


async def test_a_request_with_a_small_limit_always_asks_redis(pair) -> None:
    first, _ = pair
    checks = [Check(REQUESTS, "key:big", 100_000), Check(REQUESTS, "org:small", 100)]
    for _ in range(5):
        assert (await admit(first, member(), checks)).allowed
    assert first.round_trips == 5  # the org's limit is too small to lease: every request asks


async def redis_now_ms(counters: RedisCounters) -> float:
    seconds, micros = await command("TIME")
    return int(seconds) * 1000 + int(micros) // 1000


def test_lease_sizes() -> None:
    from nexgate_plugins.ratelimit.counters.leases import lease_size

    assert lease_size(Check(REQUESTS, "k", 100)) == 0  # 100 // 32 = 3: too small to lease
    assert lease_size(Check(REQUESTS, "k", 3200)) == 100
    assert lease_size(Check(REQUESTS, "k", 10**9)) == 4096
    assert lease_size(Check(REQUESTS, "k", 10**9), 16) == 16
    assert lease_size(Check(TOKENS, "k", 10**9, 500), 16) == 500 * 16
    assert lease_size(Check(TOKENS, "k", 10_000, 500)) == 0  # 312 tokens: not 4 requests' worth
    assert lease_size(Check(TOKENS, "k", 10**9, 0)) == 0
