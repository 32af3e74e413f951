"""Exact money: integer pico-USD (1 pUSD = 1e-12 USD).

One token of the cheapest models costs a few hundredths of a micro-dollar, so
micro-USD would round it away; pico-USD represents every price with up to six
decimals per million tokens exactly. Prices in the YAML are USD per million
tokens; one token then costs ``price * 10**6`` pUSD, an integer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import Decimal

from .config import PRICE_KEYS, Price
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


@functools.lru_cache(maxsize=1024)  # twice per request (the cost header, usage.cost), and prices repeat
def format_usd(pico: int) -> str:
    """Plain decimal string without exponent or trailing zeros, e.g. "0.000123" (integer maths: per request)."""
    whole, fraction = divmod(abs(pico), PICO_PER_USD)
    sign = "-" if pico < 0 else ""
    if not fraction:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:012d}".rstrip("0")


# ISO 4217 currencies whose minor unit is not a hundredth (payment providers count in minor units).
_ZERO_DECIMAL = frozenset("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF".split())
_THREE_DECIMAL = frozenset("BHD IQD JOD KWD LYD OMR TND".split())


def currency_exponent(currency: str) -> int:
    """Decimals of the currency's major unit: 0 for JPY, 3 for KWD, 2 for USD and most."""
    code = currency.upper()
    return 0 if code in _ZERO_DECIMAL else 3 if code in _THREE_DECIMAL else 2


def format_minor_units(minor: int, currency: str) -> str:
    """An amount in the currency's smallest unit, for a person: 1099 USD -> "10.99 USD", 500 JPY -> "500 JPY"."""
    exponent = currency_exponent(currency)
    sign = "-" if minor < 0 else ""
    whole, fraction = divmod(abs(minor), 10**exponent)
    text = f"{whole}.{fraction:0{exponent}d}" if exponent else str(whole)
    return f"{sign}{text} {currency.upper()}"


def major_to_minor_units(text: str, currency: str) -> int | None:
    """"10.99" USD -> 1099; None when it is not a plain decimal or finer than the minor unit."""
    if not text.isascii() or not text.replace(".", "", 1).isdigit():
        return None
    units = Decimal(text).scaleb(currency_exponent(currency))
    return int(units) if units == units.to_integral_value() else None


def per_token_pico(usd_per_mtok: Decimal) -> int:
    """pUSD per token for a price in USD per million tokens; exact or ValueError."""
    value = usd_per_mtok * _PICO_PER_TOKEN_PER_USD_PER_MTOK
    if value != value.to_integral_value():
        raise ValueError(f"price {usd_per_mtok} has more than 6 decimals per million tokens")
    return int(value)


def price_problems(price: Price) -> list[str]:
    """Why a price cannot be charged exactly: one line per token class that cannot (none: it can)."""
    problems = []
    for name in PRICE_KEYS:
        value = getattr(price, name)
        if value is None:
            continue
        try:
            per_token_pico(value)
        except ValueError:
            # Plain notation, as the YAML has it: str() would show 0.0000001 as 1E-7.
            problems.append(f"{name}: {value:f} has more than 6 decimals per million tokens, which NexGate cannot "
                            "charge exactly")
    return problems


@dataclass(frozen=True, slots=True)
class _Rates:
    """Integer pUSD per token of each class, the defaults filled in."""

    input: int
    cached_input: int
    cache_write: int
    cache_write_1h: int
    audio_input: int
    output: int
    audio_output: int


@functools.lru_cache(maxsize=4096)
def _rates(price: Price) -> _Rates:
    """Decimal arithmetic once per price: input-side classes default to input, audio output to output."""
    def rate(value: Decimal | None, default: int) -> int:
        return default if value is None else per_token_pico(value)

    rate_in, rate_out = per_token_pico(price.input), per_token_pico(price.output)
    rate_write = rate(price.cache_write, rate_in)
    return _Rates(input=rate_in, cached_input=rate(price.cached_input, rate_in), cache_write=rate_write,
                  cache_write_1h=rate(price.cache_write_1h, rate_write), audio_input=rate(price.audio_input, rate_in),
                  output=rate_out, audio_output=rate(price.audio_output, rate_out))


def cost_pico(price: Price, usage: Usage) -> int:
    """The exact cost of a call: each token at its class's rate.

    ``usage`` counts as OpenAI does (usage.py converts Anthropic's counts): prompt_tokens is
    every input token, and cache reads, cache writes (one-hour writes a part of them) and audio
    input are parts of it; completion_tokens is every output token, audio output a part of it.
    Each part is capped by what is left, so an upstream reporting inconsistent parts is never
    charged a token twice. Audio is taken as not cached (Chat Completions reports no split).
    """
    r = _rates(price)
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    read = min(usage.cached_tokens, prompt)
    written = min(usage.cache_write_tokens, prompt - read)
    written_1h = min(usage.cache_write_1h_tokens, written)
    audio_in = min(usage.audio_input_tokens, prompt - read - written)
    audio_out = min(usage.audio_output_tokens, completion)
    return ((prompt - read - written - audio_in) * r.input + read * r.cached_input
            + (written - written_1h) * r.cache_write + written_1h * r.cache_write_1h + audio_in * r.audio_input
            + (completion - audio_out) * r.output + audio_out * r.audio_output)


def worst_cost_pico(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """The most a call of this many input and output tokens can cost, whatever class each token
    turns out to be: a whole prompt may be written to the cache, a whole answer may be audio."""
    r = _rates(price)
    return (prompt_tokens * max(r.input, r.cached_input, r.cache_write, r.cache_write_1h, r.audio_input)
            + completion_tokens * max(r.output, r.audio_output))
