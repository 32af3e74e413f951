"""What the proxy learns about each target (provider + upstream model) as it calls it.

- ``ttfb``: an exponentially weighted moving average of the time to the upstream's
  answer (its response headers), for the least-latency strategy;
- per-minute counts of calls and tokens, for the ``rpm`` / ``tpm`` caps an operator
  sets on a route target (a provider's quota): a target at its cap is skipped until
  its minute ends. Counted per process, in fixed minutes from a target's first call;
  tokens (prompt + completion) are added when a call ends, so a burst of calls in
  flight together may pass the token cap once;
- counters of retries (per target) and fallbacks (per alias that served), for metrics.

Everything is plain dicts on the event loop: no lock, no I/O; a target without caps
costs nothing but its latency sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .cooldown import TargetKey

if TYPE_CHECKING:
    from .config import Target

EWMA_WEIGHT = 0.2
"""The newest sample's share of the average: a target that turns slow is noticed within a few calls."""
MINUTE = 60.0


class TargetStats:
    __slots__ = ("ttfb", "_minutes", "retries", "fallbacks")

    def __init__(self) -> None:
        self.ttfb: dict[TargetKey, float] = {}
        self._minutes: dict[TargetKey, list[float]] = {}
        """[minute start, calls, tokens] of targets with a cap."""
        self.retries: dict[TargetKey, int] = {}
        self.fallbacks: dict[str, int] = {}
        """Requests served by a target other than the first one tried, by the alias that served."""

    def answered(self, key: TargetKey, seconds: float) -> None:
        old = self.ttfb.get(key)
        self.ttfb[key] = seconds if old is None else old + EWMA_WEIGHT * (seconds - old)

    def capped_until(self, target: Target, key: TargetKey, now: float) -> float | None:
        """When the target takes calls again if it is at its rpm or tpm cap now; None if it is not."""
        minute = self._minutes.get(key)
        if minute is None or now >= minute[0] + MINUTE:
            return None
        if (target.rpm is not None and minute[1] >= target.rpm) or (
                target.tpm is not None and minute[2] >= target.tpm):
            return minute[0] + MINUTE
        return None

    def called(self, key: TargetKey, now: float) -> None:
        """Count a call against a capped target's minute."""
        self._minute(key, now)[1] += 1

    def took(self, key: TargetKey, now: float, tokens: int) -> None:
        """Count a finished call's tokens against a capped target's minute."""
        self._minute(key, now)[2] += tokens

    def _minute(self, key: TargetKey, now: float) -> list[float]:
        minute = self._minutes.get(key)
        if minute is None or now >= minute[0] + MINUTE:
            minute = self._minutes[key] = [now, 0.0, 0.0]
        return minute
