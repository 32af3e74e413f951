"""The request watchdog: one timer for first-byte, idle and total limits."""

from __future__ import annotations

import asyncio

import pytest

from nexgate_proxy.watchdog import Watchdog


async def test_a_wait_past_the_limit_becomes_a_timeout() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(loop, loop.time() + 60, 0.05)
    watchdog.expect(0.05)
    with pytest.raises(TimeoutError):
        with watchdog:
            await asyncio.sleep(5)
    assert watchdog.expired
    await asyncio.sleep(0)  # the task is usable afterwards: no cancellation left pending
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_progress_moves_the_limit_and_the_total_deadline_caps_it() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    watchdog = Watchdog(loop, started + 0.4, 0.1)
    watchdog.expect(0.1)
    with pytest.raises(TimeoutError):
        with watchdog:
            for _ in range(100):  # each step well inside the idle limit...
                await asyncio.sleep(0.03)
                watchdog.expect(0.1)
    # ...so only the total deadline ended it, after several idle limits' worth of time.
    assert 0.35 <= loop.time() - started < 2.0


async def test_a_limit_moved_earlier_applies_at_once() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(loop, loop.time() + 60, 30)
    watchdog.expect(30)
    with pytest.raises(TimeoutError):
        with watchdog:
            watchdog.expect(0.05)
            await asyncio.sleep(5)


async def test_a_wait_that_finishes_in_time_is_untouched_and_disarms() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(loop, loop.time() + 60, 0.05)
    watchdog.expect(0.05)
    with watchdog:
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # past the limit, outside the block: nothing fires
    assert not watchdog.expired
    watchdog.close()


async def test_one_timer_serves_consecutive_blocks_and_the_longer_first_limit() -> None:
    # The send waits under the first-byte limit (long), the read under the idle limit (short).
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(loop, loop.time() + 60, shortest=0.05)
    watchdog.expect(0.3)  # first byte: longer than the timer's first arm...
    with watchdog:
        await asyncio.sleep(0.15)  # ...so its early firing re-arms instead of cancelling
    assert not watchdog.expired
    watchdog.expect(0.05)  # idle
    with pytest.raises(TimeoutError):
        with watchdog:
            await asyncio.sleep(5)
    watchdog.close()


async def test_a_cancellation_from_elsewhere_passes_through() -> None:
    loop = asyncio.get_running_loop()

    async def guarded() -> None:
        watchdog = Watchdog(loop, loop.time() + 60, 30)
        watchdog.expect(30)
        with watchdog:
            await asyncio.sleep(5)

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
