"""Cooldowns: a circuit breaker per target (provider + upstream model), in process.

A target that failed ``failures`` times in a row (connect error, timeout, 5xx,
429) is *open*: skipped by every request until its cooldown ends. The cooldown
is the upstream's ``Retry-After`` when a 429/503 sent one (capped at
``max_retry_after``; such an answer opens the breaker at once: the provider said
when to come back), else ``cooldown`` seconds, doubled each time the breaker
opens again without a success in between, up to ``max_cooldown``. When the
cooldown ends the breaker is *half-open*: the first request to look takes the
target as a probe and the others keep skipping it for another cooldown; the
probe's success closes the breaker, its failure opens it again (backed off).
Any answer but a 5xx or 429 counts as a success (a 4xx is the request's fault:
the provider is up) and resets the count of consecutive failures.

Hot path: ``available`` is one dict lookup and one comparison (``_until`` holds
only open breakers), ``succeeded`` one dict lookup while nothing failed; no lock
(one event loop per process), no I/O. A shared version (Redis, so one instance
seeing a target fail spares the others) implements :class:`TargetHealth` the same
way: a local ``_until`` mirror fed by pub/sub, answered from memory.
"""

from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass
from typing import Mapping, Protocol

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


class TargetHealth(Protocol):
    """What the proxy asks of a breaker store; every method runs on the hot path, in memory."""

    def available(self, key: TargetKey, now: float) -> bool: ...
    def reopens_at(self, key: TargetKey) -> float: ...
    def succeeded(self, key: TargetKey) -> None: ...
    def failed(self, key: TargetKey, now: float, settings: CooldownSettings,
               retry_after: float | None = None) -> None: ...


class _Breaker:
    __slots__ = ("failures", "openings", "cooldown")

    def __init__(self) -> None:
        self.failures = 0
        self.openings = 0
        """Times opened since the last success: the backoff's exponent."""
        self.cooldown = 0.0
        """The current cooldown, also how long a half-open probe keeps the others away."""


class Cooldowns:
    """The breakers of one process, keyed by target; ``now`` is the event loop's clock."""

    def __init__(self) -> None:
        self._until: dict[TargetKey, float] = {}
        """Open (or probing) breakers: until when the target is skipped."""
        self._breakers: dict[TargetKey, _Breaker] = {}
        """Targets with a failure since their last success."""

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

    def succeeded(self, key: TargetKey) -> None:
        if self._breakers and key in self._breakers:
            del self._breakers[key]
            self._until.pop(key, None)

    def failed(self, key: TargetKey, now: float, settings: CooldownSettings,
               retry_after: float | None = None) -> None:
        if settings.failures <= 0:
            return
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = _Breaker()
        breaker.failures += 1
        if retry_after is not None:
            cooldown = min(max(retry_after, 0.0), settings.max_retry_after)
        elif breaker.failures >= settings.failures:
            cooldown = min(settings.cooldown * 2 ** breaker.openings, settings.max_cooldown)
        else:
            return
        breaker.openings += 1
        breaker.cooldown = max(cooldown, 0.001)
        self._until[key] = now + breaker.cooldown


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
