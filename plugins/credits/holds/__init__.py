"""Hot credit state: cached balances and open holds, in process or on Redis (see ``base``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    KEY_TTL_SECONDS,
    BalanceLoader,
    Booker,
    Credited,
    CreditState,
    CreditStateUnavailable,
    Reservation,
    StoreBalance,
)
from .memory import MemoryCreditState

if TYPE_CHECKING:
    from nexgate_proxy.state.redis import RedisClient


def open_credit_state(url: str, *, redis: RedisClient | None = None, **options: object) -> CreditState:
    """``redis``: the process's client for a Redis URL (without it, the state opens one of its own)."""
    if url.startswith("memory://"):
        return MemoryCreditState()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisCreditState

        return RedisCreditState(redis or url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unsupported state URL scheme {url.split(':', 1)[0]!r}")


__all__ = [
    "KEY_TTL_SECONDS", "BalanceLoader", "Booker", "Credited", "CreditState",
    "CreditStateUnavailable", "MemoryCreditState", "Reservation", "StoreBalance",
    "open_credit_state",
]
