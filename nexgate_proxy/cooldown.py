"""Cooldowns: a circuit breaker per target (provider + upstream model).

A target that failed ``failures`` times in a row (connect error, timeout, 5xx,
429), or whose failures reached ``failure_ratio`` of at least ``min_calls`` calls
in a window of ``window`` seconds (the window starts at a failure: nothing is
counted while a target never fails), is *open*: skipped by every request until
its cooldown ends. The cooldown is the upstream's ``Retry-After`` when a 429/503
sent one (capped at ``max_retry_after``; such an answer opens the breaker at
once: the provider said when to come back), else ``cooldown`` seconds, doubled
each time the breaker opens again without a success in between, up to
``max_cooldown``. When the cooldown ends the breaker is *half-open*: the first
request to look takes the target as a probe and the others keep skipping it for
another cooldown; the probe's success closes the breaker, its failure opens it
again (backed off). Any answer but a 5xx or 429 counts as a success (a 4xx is
the request's fault: the provider is up) and resets the count of consecutive
failures.

Hot path: while no breaker is open (``cooling`` empty) the proxy asks nothing per
target; else ``available`` is one dict lookup and one comparison, ``succeeded`` one dict lookup while nothing failed; no lock
(one event loop per process), no I/O. Shared across instances (``state.url`` on
Redis): openings and closings go out on the invalidation bus (``announce``) and
come in through ``learned`` into the same in-memory tables, so the hot path
still answers from memory.
"""

from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

TargetKey = tuple[str, str]
"""(provider name, upstream model)."""


@dataclass(frozen=True, slots=True)
class CooldownSettings:
    """When a target is taken out of rotation, and for how long (seconds)."""

    failures: int = 3
    """Consecutive failures that open the breaker; 0 turns cooldowns off for the target."""
    cooldown: float = 30.0
    """The first cooldown without a Retry-After; doubled on each re-opening."""
    max_cooldown: float = 300.0
    """The cap of the doubled cooldown."""
    max_retry_after: float = 300.0
    """The longest Retry-After honoured; a provider asking for more is retried after this."""
    failure_ratio: float = 0.5
    """Failed share of the calls in a window that opens the breaker too (flaky, not down); 0 = off."""
    window: float = 60.0
    """The window of the ratio: it starts at a failure, calls are counted until it ends."""
    min_calls: int = 10
    """Calls a window needs before its ratio counts."""


class TargetHealth(Protocol):
    """What the proxy asks of a breaker store; every method runs on the hot path, in memory."""

    cooling: Mapping[TargetKey, float]
    """The open (or probing) breakers; while it is empty every target is available (no clock read, no call)."""

    def available(self, key: TargetKey, now: float) -> bool: ...
    def reopens_at(self, key: TargetKey) -> float: ...
    def is_open(self, key: TargetKey, now: float) -> bool: ...
    def succeeded(self, key: TargetKey, now: float) -> None: ...
    def failed(self, key: TargetKey, now: float, settings: CooldownSettings,
               retry_after: float | None = None) -> None: ...


class _Breaker:
    __slots__ = ("failures", "openings", "cooldown", "window_end", "calls", "failed")

    def __init__(self, window_end: float) -> None:
        self.failures = 0
        """Consecutive failures."""
        self.openings = 0
        """Times opened since the last success: the backoff's exponent."""
        self.cooldown = 0.0
        """The current cooldown, also how long a half-open probe keeps the others away."""
        self.window_end = window_end
        self.calls = 0
        """Calls answered in the window (from the failure that started it), and how many failed."""
        self.failed = 0


Announce = Callable[[TargetKey, float], None]
"""Told when a breaker opens (its cooldown in seconds) or closes (0): to share it with other instances."""


class Cooldowns:
    """The breakers of one process, keyed by target; ``now`` is the event loop's clock.

    ``announce`` (set when ``state.url`` is Redis, see ``nexgate_plugins.routing``) publishes each
    opening and closing; :meth:`learned` applies another instance's, so one instance seeing a
    target fail spares the others. Both are rare events; the hot path never waits on them.
    """

    def __init__(self) -> None:
        self._until: dict[TargetKey, float] = {}
        """Open (or probing) breakers: until when the target is skipped."""
        self.cooling: Mapping[TargetKey, float] = self._until
        self._breakers: dict[TargetKey, _Breaker] = {}
        """Targets with a failure since their last success, or in an unfinished ratio window."""
        self.announce: Announce | None = None

    def available(self, key: TargetKey, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return True
        if now < until:
            return False
        # Half-open: this request probes; the others keep skipping the target until it reports.
        breaker = self._breakers.get(key)
        self._until[key] = now + (breaker.cooldown if breaker else 1.0)
        return True

    def reopens_at(self, key: TargetKey) -> float:
        """When a skipped target takes traffic again (a probe) on the event loop's clock."""
        return self._until.get(key, 0.0)

    def is_open(self, key: TargetKey, now: float) -> bool:
        """Skipped now (without taking the probe, unlike ``available``)."""
        return now < self._until.get(key, 0.0)

    def succeeded(self, key: TargetKey, now: float) -> None:
        if not self._breakers:
            return
        breaker = self._breakers.get(key)
        if breaker is None:
            return
        if self._until.pop(key, None) is not None and self.announce is not None:
            self.announce(key, 0.0)  # the probe served: closed, for every instance
        if now >= breaker.window_end:
            del self._breakers[key]
            return
        breaker.failures = breaker.openings = 0
        breaker.calls += 1

    def failed(self, key: TargetKey, now: float, settings: CooldownSettings,
               retry_after: float | None = None) -> None:
        if settings.failures <= 0:
            return
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = _Breaker(now + settings.window)
        elif now >= breaker.window_end:
            breaker.window_end, breaker.calls, breaker.failed = now + settings.window, 0, 0
        breaker.failures += 1
        breaker.calls += 1
        breaker.failed += 1
        if retry_after is not None:
            cooldown = min(max(retry_after, 0.0), settings.max_retry_after)
        elif (breaker.failures >= settings.failures or key in self._until  # a probe failed
              or (settings.failure_ratio > 0 and breaker.calls >= settings.min_calls
                  and breaker.failed >= settings.failure_ratio * breaker.calls)):
            cooldown = min(settings.cooldown * 2 ** breaker.openings, settings.max_cooldown)
        else:
            return
        breaker.openings += 1
        breaker.cooldown = max(cooldown, 0.001)
        breaker.calls = breaker.failed = 0  # the ratio needs new evidence after a cooldown
        self._until[key] = now + breaker.cooldown
        if self.announce is not None:
            self.announce(key, breaker.cooldown)

    def learned(self, key: TargetKey, now: float, seconds: float) -> None:
        """Another instance opened (``seconds`` > 0) or closed (0) this target's breaker."""
        if seconds <= 0:
            self._until.pop(key, None)
            self._breakers.pop(key, None)
            return
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = _Breaker(now)
        breaker.cooldown = seconds
        self._until[key] = max(self._until.get(key, 0.0), now + seconds)

    def states(self, now: float) -> list[tuple[TargetKey, int]]:
        """Each target with a breaker: 2 open (skipped), 1 half-open (the next call probes), 0 closed."""
        out = []
        for key in list(self._breakers):
            until = self._until.get(key)
            out.append((key, 0 if until is None else 2 if now < until else 1))
        return out


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """An upstream's ``Retry-After`` (delta seconds or an HTTP date) in seconds from now; None if absent or bad."""
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)
