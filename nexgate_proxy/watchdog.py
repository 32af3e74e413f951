"""One timer for every wait limit of a request: first byte, idle gaps, the total deadline.

``asyncio.timeout`` arms a timer handle per context and another per
``reschedule``; a stream relay that moves its idle limit on every event would pay
that per event. Here moving the limit is writing a number: the timer, when it
fires before the current limit, re-arms itself for it (only a limit moved
earlier re-arms at once, which is rare).

Inside ``with watchdog:`` a wait that outlives the limit is cancelled and
surfaces as ``TimeoutError`` when the block exits, as with ``asyncio.timeout``;
a cancellation from elsewhere (shutdown) passes through unchanged.
"""

from __future__ import annotations

import asyncio
import sys
from types import TracebackType
from typing import Any, Callable

current_task: Callable[[asyncio.AbstractEventLoop], Any] = asyncio.current_task
"""``asyncio.current_task(loop)``, the loop given: on 3.11 that is Python code around this dict lookup (C since 3.12)."""
if sys.version_info < (3, 12):
    from asyncio.tasks import _current_tasks  # type: ignore[attr-defined]

    current_task = _current_tasks.get


class Watchdog:
    __slots__ = ("_loop", "_deadline", "_shortest", "_due", "_handle", "_armed", "_task", "_cancelling", "_active",
                 "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float, shortest: float) -> None:
        self._loop = loop
        self._deadline = deadline
        """The request's total deadline (loop time): no limit goes past it."""
        self._shortest = shortest
        """The shortest limit ``expect`` will be given: the timer is first armed that far ahead, so a
        later, shorter limit never needs it re-armed earlier; a longer one re-arms it when it fires."""
        self._due = deadline
        self._handle: asyncio.TimerHandle | None = None
        self._armed = 0.0
        """When the timer fires (``_handle.when()`` without a method call per stream event)."""
        self._task: asyncio.Task | None = None
        self._cancelling = 0
        self._active = False
        self.expired = False

    def expect(self, within: float) -> None:
        """The next progress must come within ``within`` seconds (and before the deadline)."""
        due = self._loop.time() + within
        if due > self._deadline:
            due = self._deadline
        self._due = due
        handle = self._handle
        if handle is not None and due < self._armed:
            handle.cancel()
            self._arm(due)

    def __enter__(self) -> Watchdog:
        task = current_task(self._loop)
        assert task is not None, "a watchdog guards a task"
        self._task = task
        self._cancelling = task.cancelling()
        self._active = True
        self.expired = False
        if self._handle is None:  # one timer for the whole request: blocks after the first reuse it
            first = self._loop.time() + self._shortest
            self._arm(first if first < self._due else self._due)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._active = False
        if self.expired:
            assert self._task is not None
            # As asyncio.timeout does: only our own cancellation becomes a TimeoutError.
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def _arm(self, when: float) -> None:
        self._armed = when
        self._handle = self._loop.call_at(when, self._fire)

    def close(self) -> None:
        """The request is over: disarm."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        if not self._active:
            return  # between two blocks: the next one arms again
        # Progress moved the limit since this was armed. (Timers may fire up to the clock's
        # resolution early: a millisecond of slack keeps that from re-arming in a loop.)
        if self._loop.time() + 0.001 < self._due:
            self._arm(self._due)
            return
        self.expired = True
        assert self._task is not None
        self._task.cancel()
