"""Credit holds on Redis, served from per-instance leases (nexgate_plugins.credits.holds.redis).

Real Redis; each test works under its own key prefix. "Instances" are RedisCreditState objects
with their own connections, as two gateway processes would have.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexgate_plugins.credits.holds import redis as credit_redis
from nexgate_plugins.credits.holds import CreditStateUnavailable
from nexgate_plugins.credits.holds.redis import RedisCreditState
from nexgate_proxy.state.redis import encode_command, open_resp, parse_redis_url
from nexgate_proxy.testing import require_redis

pytestmark = pytest.mark.redis


def instances(redis_url: str, n: int = 2) -> list[RedisCreditState]:
    prefix = f"nexgate:test:{secrets.token_hex(4)}"
    return [RedisCreditState(redis_url, prefix=prefix) for _ in range(n)]


def balance_of(pico: int):
    async def load() -> int:
        return pico
    return load


async def redis_command(redis_url: str, *args: object) -> object:
    conn = await open_resp(parse_redis_url(redis_url))
    try:
        return await conn.call(encode_command(*args))
    finally:
        conn.abort()


async def test_a_settle_is_seen_by_the_next_reserve(redis_url: str) -> None:
    state, = instances(redis_url, 1)
    load = balance_of(1_000)
    try:
        assert (await state.reserve("acct", "r1", 600, 0, 60, load)).ok
        assert not (await state.reserve("acct", "r2", 600, 0, 60, load)).ok  # r1's hold is in the way
        state.settle("acct", "r1", 150)  # in process, nothing waited for...
        reservation = await state.reserve("acct", "r2", 600, 0, 60, load)  # ...and the next call sees it
        assert reservation.ok and reservation.available_pico == 1_000 - 150 - 600
        state.settle("acct", "r2", 0)
        assert await state.available("acct") == 850
        assert state._redis.failures == 0
    finally:
        await state.close()


def booking(ledger: dict[str, int], amount: int, applied: bool = True):
    """A ledger commit (pico-USD, as the cache counts)."""
    async def book() -> bool:
        if applied:
            ledger["balance"] += amount
        return applied
    return book


async def test_a_credit_racing_the_first_balance_load_is_not_lost(redis_url: str) -> None:
    """The load reads the ledger before the credit commits; the credit ends before the load is written."""
    state, = instances(redis_url, 1)
    ledger = {"balance": 0}
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        value = ledger["balance"]
        if loads == 1:  # the payment is booked and announced while this read is in flight
            assert (await state.credit("acct", 100, booking(ledger, 100))).booked
        return value

    try:
        reservation = await state.reserve("acct", "r1", 0, 0, 60, load)
        assert reservation.ok and loads == 2
        assert await state.available("acct") == 100
    finally:
        await state.close()


async def test_a_credit_racing_another_instances_first_load_is_counted_once(redis_url: str) -> None:
    """The load reads the ledger after the credit committed; the credit's end reaches Redis after the
    load's answer (the webhook's instance is slow). Announced only after the commit (the old protocol),
    the credit was counted twice (200)."""
    a, b = instances(redis_url)
    ledger = {"balance": 0}
    committed, answered = asyncio.Event(), asyncio.Event()
    loads = 0

    async def slow_book() -> bool:
        ledger["balance"] += 100
        committed.set()
        await answered.wait()  # the store's answer is slow to come back
        return True

    async def load() -> int:
        nonlocal loads
        loads += 1
        return ledger["balance"]

    try:
        crediting = asyncio.create_task(b.credit("acct", 100, slow_book))
        await committed.wait()
        reserving = asyncio.create_task(a.reserve("acct", "r1", 0, 0, 60, load))
        await asyncio.sleep(0.1)
        assert not reserving.done() and loads == 0  # no load is taken while a credit is being booked
        answered.set()
        assert (await crediting) == credit_redis.Credited(booked=True, reached_state=True)
        assert (await reserving).ok and loads == 1
        assert await a.available("acct") == await b.available("acct") == ledger["balance"] == 100
    finally:
        await a.close()
        await b.close()


async def test_a_load_written_before_a_credit_gets_it_once(redis_url: str) -> None:
    a, b = instances(redis_url)
    ledger = {"balance": 500}
    load = balance_of(500)
    try:
        assert (await a.reserve("acct", "r1", 0, 0, 60, load)).ok
        assert (await b.credit("acct", 100, booking(ledger, 100))).booked
        assert (await b.credit("acct", 100, booking(ledger, 100, applied=False))) == credit_redis.Credited(
            booked=False, reached_state=True)  # already in the ledger: nothing moves
        assert await a.available("acct") == ledger["balance"] == 600
    finally:
        await a.close()
        await b.close()


async def test_a_credit_whose_booking_fails_midway_drops_the_cached_balance(redis_url: str) -> None:
    """The commit may or may not have happened: only the ledger can say, so the cache reloads."""
    state, = instances(redis_url, 1)
    ledger = {"balance": 500}

    async def load() -> int:
        return ledger["balance"]

    async def lost_answer() -> bool:
        ledger["balance"] += 100  # committed, but the connection dropped before the answer
        raise ConnectionResetError

    try:
        assert (await state.reserve("acct", "r1", 0, 0, 60, load)).ok
        with pytest.raises(ConnectionResetError):
            await state.credit("acct", 100, lost_answer)
        assert await state.available("acct") is None
        assert (await state.reserve("acct", "r2", 1, 0, 60, load)).ok  # beyond the lease: a grow, which loads
        state.settle("acct", "r2", 0)
        assert await state.available("acct") == 600
    finally:
        await state.close()


async def test_a_credit_booked_past_its_mark_is_placed_by_a_reload(redis_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A booker slower than CREDIT_OPEN_TTL no longer blocks loads; a load written meanwhile may or
    may not hold its credit, so its close drops the cache rather than guess."""
    monkeypatch.setattr(credit_redis, "CREDIT_OPEN_TTL", 0.2)
    a, b = instances(redis_url)
    ledger = {"balance": 0}
    answered = asyncio.Event()

    async def slow_book() -> bool:
        ledger["balance"] += 100
        await answered.wait()
        return True

    async def load() -> int:
        return ledger["balance"]

    try:
        crediting = asyncio.create_task(b.credit("acct", 100, slow_book))
        await asyncio.sleep(0.3)
        assert (await a.reserve("acct", "r1", 0, 0, 60, load)).ok  # the mark expired: loaded, with the credit
        answered.set()
        await crediting
        assert await a.available("acct") is None
        assert (await a.reserve("acct", "r2", 1, 0, 60, load)).ok
        a.settle("acct", "r2", 0)
        assert await a.available("acct") == 100
    finally:
        await a.close()
        await b.close()


async def test_a_booker_that_died_mid_credit_blocks_first_loads_briefly(redis_url: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credit_redis, "CREDIT_WAIT", 0.1)
    a, b = instances(redis_url)
    load = balance_of(100)
    try:
        bal, _, _, _, version, crediting = b._keys("acct")  # b opens a credit, and dies before closing it
        await b._call("credit_open", [bal, version, crediting], ["dead", time.time() + 0.5, 60])
        with pytest.raises(CreditStateUnavailable):  # 503 "retry shortly"
            await a.reserve("acct", "r1", 0, 0, 60, load)
        await asyncio.sleep(0.5)  # its mark expired
        assert (await a.reserve("acct", "r1", 0, 0, 60, load)).ok
    finally:
        await a.close()
        await b.close()


async def test_with_plenty_of_balance_requests_do_not_call_redis(redis_url: str) -> None:
    state, = instances(redis_url, 1)
    load = balance_of(10_000_000)
    try:
        for i in range(500):
            assert (await state.reserve("acct", f"r{i}", 1_000, 0, 60, load)).ok
            state.settle("acct", f"r{i}", 10)
        # One grow took a slice of 32 holds; every settle after it stayed in process.
        assert state._redis.round_trips <= 3
        assert await state.available("acct") == 10_000_000 - 500 * 10
    finally:
        await state.close()


async def test_a_small_balance_is_shared_hold_by_hold_across_instances(redis_url: str) -> None:
    """Below 'plenty', a lease is exactly what is held, and spare goes back at the next flush."""
    a, b = instances(redis_url)
    load = balance_of(1_000)
    try:
        assert (await a.reserve("acct", "a1", 400, 0, 60, load)).ok
        assert (await b.reserve("acct", "b1", 400, 0, 60, load)).ok
        refused = await a.reserve("acct", "a2", 400, 0, 60, load)
        assert not refused.ok and refused.available_pico == 200
        a.settle("acct", "a1", 100)  # 300 of a's lease is spare now...
        await asyncio.sleep(credit_redis.FLUSH_INTERVAL * 4)  # ...and goes back with the next flush
        assert (await b.reserve("acct", "b2", 400, 0, 60, load)).ok  # 1000 - 100 - 400 held by b1 = 500
        assert not (await b.reserve("acct", "b3", 400, 0, 60, load)).ok
        b.settle("acct", "b1", 400)
        b.settle("acct", "b2", 400)
        assert await a.available("acct") == await b.available("acct") == 100
    finally:
        await a.close()
        await b.close()


async def test_concurrent_reserves_on_two_instances_never_overdraw(redis_url: str) -> None:
    a, b = instances(redis_url)
    load = balance_of(10 * 700)
    try:
        results = await asyncio.gather(*[
            (a if i % 2 else b).reserve("acct", f"r{i}", 700, 0, 60, load) for i in range(200)])
        assert sum(r.ok for r in results) == 10
    finally:
        await a.close()
        await b.close()


async def test_a_dead_instances_lease_expires(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credit_redis, "LEASE_TTL", 1.0)
    monkeypatch.setattr(credit_redis, "LEASE_MARGIN", 0.5)
    a, b = instances(redis_url)
    load = balance_of(1_000_000)
    try:
        assert (await a.reserve("acct", "a1", 1_000, 0, 60, load)).ok  # plenty: a leases 33,000
        a._flusher.cancel()  # a "dies": it renews nothing any more
        assert not (await b.reserve("acct", "big", 1_000_000 - 1_000, 0, 60, load)).ok
        await asyncio.sleep(1.2)
        assert (await b.reserve("acct", "big", 1_000_000 - 1_000, 0, 60, load)).ok
        # a's own clock says its lease may be gone: it takes a new one rather than use the old.
        assert (await a.reserve("acct", "a2", 1_000, 0, 60, load)).ok
        assert a._accounts["acct"].generation == 1 and a._accounts["acct"].granted == 1_000
        assert not (await a.reserve("acct", "a3", 1, 0, 60, load)).ok
    finally:
        await a.close()
        await b.close()


async def test_a_lease_redis_lost_is_given_up(redis_url: str) -> None:
    state, = instances(redis_url, 1)
    load = balance_of(1_000_000)
    try:
        assert (await state.reserve("acct", "r1", 1_000, 0, 60, load)).ok
        account = state._accounts["acct"]
        old_lease = account.lease_id
        await redis_command(redis_url, "DEL", *state._keys("acct")[:4])  # e.g. a restart without persistence
        state.settle("acct", "r1", 10)
        await asyncio.sleep(credit_redis.FLUSH_INTERVAL * 4)
        assert account.lease_id != old_lease and account.granted == 0
        assert (await state.reserve("acct", "r2", 1_000, 0, 60, load)).ok  # reloaded, new lease
        assert account.granted > 0
    finally:
        await state.close()


async def test_a_flush_that_never_left_is_carried_by_the_next_one(redis_url: str) -> None:
    """With the circuit open nothing reaches Redis: the settled costs must not go missing from the
    shared balance (and the lease must not keep what they released) once Redis is back."""
    state, = instances(redis_url, 1)
    load = balance_of(1_000_000)
    bal, held = state._keys("acct")[:2]
    try:
        assert (await state.reserve("acct", "r1", 1_000, 0, 60, load)).ok
        state.settle("acct", "r1", 400)
        breaker = state._redis.breaker
        for _ in range(breaker.threshold):
            breaker.failure()
        with pytest.raises(CreditStateUnavailable):
            await state.available("acct")  # its flush is refused before it is sent
        breaker.close()
    finally:
        await state.close()  # gives the whole lease back, with the costs
    assert int(await redis_command(redis_url, "GET", bal)) == 1_000_000 - 400
    assert int(await redis_command(redis_url, "GET", held) or 0) == 0


async def test_with_redis_down_the_lease_keeps_serving_and_a_grow_fails_fast() -> None:
    state = RedisCreditState(require_redis(), prefix=f"nexgate:test:{secrets.token_hex(4)}", timeout=0.2)
    load = balance_of(1_000_000)
    try:
        assert (await state.reserve("acct", "r1", 1_000, 0, 60, load)).ok
        state._redis.redis._conn.abort()  # the connection drops; the address still answers, so break that too
        state._redis.redis.address = parse_redis_url("redis://127.0.0.1:1/0")
        assert (await state.reserve("acct", "r2", 1_000, 0, 60, load)).ok  # room in the lease: no call
        with pytest.raises(CreditStateUnavailable):
            await state.reserve("acct", "huge", 10_000_000, 0, 60, load)
    finally:
        await state.close()


async def test_a_hold_that_never_settles_frees_itself(redis_url: str) -> None:
    """A request that never settled (a cancelled handler) must not pin the balance for others."""
    a, b = instances(redis_url)
    load = balance_of(1_000)
    try:
        assert (await a.reserve("acct", "lost", 800, 0, 0.5, load)).ok  # a small balance: a lease of 800
        assert not (await b.reserve("acct", "b1", 800, 0, 60, load)).ok
        await asyncio.sleep(2.5)  # past its expiry: a's next scan drops it and gives the room back
        assert (await b.reserve("acct", "b1", 800, 0, 60, load)).ok
        a.settle("acct", "lost", 0)  # a late settle of the dropped hold changes nothing
        b.settle("acct", "b1", 300)
        assert await b.available("acct") == 700  # b's settle booked (by this call), its spare given back
        assert await a.available("acct") == 700
    finally:
        await a.close()
        await b.close()


async def test_close_gives_the_lease_back(redis_url: str) -> None:
    a, b = instances(redis_url)
    load = balance_of(1_000_000)
    try:
        assert (await a.reserve("acct", "a1", 1_000, 0, 60, load)).ok
        a.settle("acct", "a1", 5)
        await a.close()
        assert await b.available("acct") == 1_000_000 - 5
    finally:
        await b.close()


OPS = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 1), st.integers(0, 5_000)),
    st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 100)),
    st.tuples(st.just("credit"), st.integers(0, 1), st.integers(0, 5_000)),
), max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.integers(0, 10_000), overdraft=st.integers(0, 2_000), ops=OPS, batch=st.integers(1, 8))
def test_two_instances_never_overdraw_and_end_at_the_ledger(initial: int, overdraft: int, ops: list[tuple],
                                                             batch: int) -> None:
    """Any interleaving of reserve / settle / credit on two instances (costs at most what was held)."""
    redis_url = require_redis()

    async def scenario() -> None:
        pair = instances(redis_url)
        ledger = {"balance": initial}
        holds: dict[str, tuple[int, int]] = {}  # request id -> (instance, amount)
        counter = iter(range(10**6))

        async def load() -> int:
            await asyncio.sleep(0)  # let other operations interleave with the first load
            return ledger["balance"]

        async def run(op: tuple) -> None:
            if op[0] == "reserve":
                rid = f"r{next(counter)}"
                if (await pair[op[1]].reserve("acct", rid, op[2], overdraft, 3600, load)).ok:
                    holds[rid] = (op[1], op[2])
                    assert sum(amount for _, amount in holds.values()) <= ledger["balance"] + overdraft
            elif op[0] == "settle":
                if holds:
                    rid = sorted(holds)[op[1] % len(holds)]
                    instance, amount = holds.pop(rid)
                    cost = amount * op[2] // 100
                    ledger["balance"] -= cost
                    pair[instance].settle("acct", rid, cost)
            else:
                await pair[op[1]].credit("acct", op[2], booking(ledger, op[2]))

        try:
            for i in range(0, len(ops), batch):
                await asyncio.gather(*[run(op) for op in ops[i:i + batch]])
            for rid, (instance, amount) in sorted(holds.items()):
                ledger["balance"] -= amount
                pair[instance].settle("acct", rid, amount)
            await pair[0].close()  # gives its lease back
            available = await pair[1].available("acct")
            if available is not None:  # cached: exactly the ledger
                assert available == ledger["balance"]
        finally:
            for state in pair:
                await state.close()

    asyncio.run(scenario())
