"""Hot credit state: cached balances and open holds, in process or on Redis (see ``base``)."""

from __future__ import annotations

from .base import (
    KEY_TTL_SECONDS,
    PICO_PER_NANO,
    BalanceLoader,
    CreditState,
    CreditStateUnavailable,
    Reservation,
    StoreBalance,
    nano_ceil,
    nano_floor,
)
from .memory import MemoryCreditState


def open_credit_state(url: str, **options: object) -> CreditState:
    if url.startswith("memory://"):
        return MemoryCreditState()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisCreditState

        return RedisCreditState(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unsupported state URL scheme {url.split(':', 1)[0]!r}")


__all__ = [
    "KEY_TTL_SECONDS", "PICO_PER_NANO", "BalanceLoader", "CreditState", "CreditStateUnavailable",
    "MemoryCreditState", "Reservation", "StoreBalance", "nano_ceil", "nano_floor", "open_credit_state",
]
