"""Credits booked through the in-process hot state (memory://) reach a cached balance exactly once."""

from __future__ import annotations

import asyncio

import pytest

from nexgate_plugins.credits.holds import Credited, MemoryCreditState


def ledger_load(ledger: dict[str, int]):
    async def load() -> int:
        return ledger["balance"] * 1000  # pico-USD
    return load


async def test_a_first_load_that_reads_a_booked_credit_before_its_end_counts_it_once() -> None:
    """The commit is in the ledger, its answer comes back late; a request loads the balance meanwhile.
    Before the fix the load held the credit and the credit was added again (200)."""
    state = MemoryCreditState()
    ledger = {"balance": 0}
    committed, answered = asyncio.Event(), asyncio.Event()

    async def slow_book() -> bool:
        ledger["balance"] += 100
        committed.set()
        await answered.wait()
        return True

    crediting = asyncio.create_task(state.credit("acct", 100, slow_book))
    await committed.wait()
    reserving = asyncio.create_task(state.reserve("acct", "r1", 0, 0, 60, ledger_load(ledger)))
    await asyncio.sleep(0.01)
    assert not reserving.done()  # no load is taken while a credit is being booked
    answered.set()
    assert await crediting == Credited(booked=True, reached_state=True)
    assert (await reserving).ok
    assert await state.available("acct") == ledger["balance"] == 100


async def test_a_credit_that_was_booked_before_moves_nothing() -> None:
    state = MemoryCreditState()
    ledger = {"balance": 50}
    assert (await state.reserve("acct", "r1", 0, 0, 60, ledger_load(ledger))).ok

    async def duplicate() -> bool:
        return False

    assert not (await state.credit("acct", 100, duplicate)).booked
    assert await state.available("acct") == 50


async def test_a_booking_that_fails_midway_reloads_the_balance_and_keeps_the_holds() -> None:
    state = MemoryCreditState()
    ledger = {"balance": 500}
    assert (await state.reserve("acct", "r1", 200, 0, 60, ledger_load(ledger))).ok

    async def lost_answer() -> bool:
        ledger["balance"] += 100  # committed; the answer never came
        raise ConnectionResetError

    with pytest.raises(ConnectionResetError):
        await state.credit("acct", 100, lost_answer)
    assert await state.available("acct") is None  # unknown until loaded again
    assert (await state.reserve("acct", "r2", 0, 0, 60, ledger_load(ledger))).ok  # reloaded: 600
    assert await state.available("acct") == 600 - 200  # r1 still holds
    state.settle("acct", "r1", 50)
    assert await state.available("acct") == 550
