"""Exact money: integer pico-USD (1 pUSD = 1e-12 USD).

One token of the cheapest models costs a few hundredths of a micro-dollar, so
micro-USD would round it away; pico-USD represents every price with up to six
decimals per million tokens exactly. Prices in the YAML are USD per million
tokens; one token then costs ``price * 10**6`` pUSD, an integer.
"""

from __future__ import annotations

import functools
from decimal import Decimal

from .config import Price
from .context import Usage

PICO_PER_USD = 10**12
_PICO_PER_TOKEN_PER_USD_PER_MTOK = 10**6


def usd_to_pico(usd: Decimal) -> int:
    pico = usd * PICO_PER_USD
    if pico != pico.to_integral_value():
        raise ValueError(f"{usd} USD is finer than one pico-dollar")
    return int(pico)


def pico_to_usd(pico: int) -> Decimal:
    """Exact: a Decimal with up to 12 decimals."""
    return Decimal(pico).scaleb(-12)


def format_usd(pico: int) -> str:
    """Plain decimal string without exponent or trailing zeros, e.g. "0.000123" (integer maths: per request)."""
    whole, fraction = divmod(abs(pico), PICO_PER_USD)
    sign = "-" if pico < 0 else ""
    if not fraction:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:012d}".rstrip("0")


def per_token_pico(usd_per_mtok: Decimal) -> int:
    """pUSD per token for a price in USD per million tokens; exact or ValueError."""
    value = usd_per_mtok * _PICO_PER_TOKEN_PER_USD_PER_MTOK
    if value != value.to_integral_value():
        raise ValueError(f"price {usd_per_mtok} has more than 6 decimals per million tokens")
    return int(value)


def price_problem(price: Price) -> str | None:
    """Why a price cannot be charged exactly, or None."""
    for name in ("input", "output", "cached_input"):
        value = getattr(price, name)
        if value is None:
            continue
        try:
            per_token_pico(value)
        except ValueError:
            # Plain notation, as the YAML has it: str() would show 0.0000001 as 1E-7.
            return f"{name}: {value:f} has more than 6 decimals per million tokens, which NexGate cannot charge exactly"
    return None


@functools.lru_cache(maxsize=4096)
def _rates(price: Price) -> tuple[int, int | None, int]:
    """Integer pUSD per token (input, cached input, output): Decimal arithmetic once per price."""
    cached = per_token_pico(price.cached_input) if price.cached_input is not None else None
    return per_token_pico(price.input), cached, per_token_pico(price.output)


def cost_pico(price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
    """The exact cost of a call. Cached prompt tokens cost ``cached_input`` when the price has one."""
    rate_in, rate_cached, rate_out = _rates(price)
    if rate_cached is None:
        return prompt_tokens * rate_in + completion_tokens * rate_out
    cached = min(cached_tokens, prompt_tokens)
    return (prompt_tokens - cached) * rate_in + cached * rate_cached + completion_tokens * rate_out


def usage_cost_pico(price: Price, usage: Usage) -> int:
    return cost_pico(price, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
