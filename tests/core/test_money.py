"""The cost arithmetic: each token class at its rate, exactly, and never above the worst case."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from nexgate_proxy.config import Price
from nexgate_proxy.context import Usage
from nexgate_proxy.money import cost_pico, worst_cost_pico

RATE = st.one_of(st.none(), st.integers(0, 10**8).map(lambda n: Decimal(n).scaleb(-6)))  # USD per 1M, 6 decimals


def test_classes_left_out_cost_their_base_rate() -> None:
    usage = Usage(prompt_tokens=100, completion_tokens=10, cached_tokens=30, cache_write_tokens=20,
                  audio_input_tokens=5, audio_output_tokens=4)
    plain = Price(input=Decimal(1), output=Decimal(2))
    assert cost_pico(plain, usage) == 100 * 10**6 + 10 * 2 * 10**6
    full = Price(input=Decimal(1), output=Decimal(2), cached_input=Decimal("0.1"), cache_write=Decimal("1.25"),
                 audio_input=Decimal(40), audio_output=Decimal(80))
    assert cost_pico(full, usage) == (45 * 10**6 + 30 * 100_000 + 20 * 1_250_000 + 5 * 40 * 10**6
                                      + 6 * 2 * 10**6 + 4 * 80 * 10**6)


def test_one_hour_writes_cost_cache_write_1h_or_else_cache_write() -> None:
    usage = Usage(prompt_tokens=100, completion_tokens=0, cache_write_tokens=60, cache_write_1h_tokens=40)
    price = Price(input=Decimal(3), output=Decimal(15), cache_write=Decimal("3.75"))
    assert cost_pico(price, usage) == 40 * 3 * 10**6 + 60 * 3_750_000
    price = Price(input=Decimal(3), output=Decimal(15), cache_write=Decimal("3.75"), cache_write_1h=Decimal(6))
    assert cost_pico(price, usage) == 40 * 3 * 10**6 + 20 * 3_750_000 + 40 * 6 * 10**6


def test_parts_beyond_the_total_are_never_charged_twice() -> None:
    # An upstream claiming more cached + written tokens than its prompt: each token is charged once.
    price = Price(input=Decimal(1), output=Decimal(1), cached_input=Decimal(0), cache_write=Decimal(10))
    usage = Usage(prompt_tokens=10, completion_tokens=0, cached_tokens=8, cache_write_tokens=8)
    assert cost_pico(price, usage) == 8 * 0 + 2 * 10 * 10**6


@settings(max_examples=500, deadline=None)
@given(rates=st.tuples(*[RATE] * 7), prompt=st.integers(0, 10**6),
       completion=st.integers(0, 10**5), parts=st.tuples(*[st.integers(0, 10**6)] * 5))
def test_no_split_of_the_tokens_costs_more_than_the_worst_case(rates, prompt, completion, parts) -> None:
    base_in, base_out, cached, write, write_1h, audio_in, audio_out = rates
    price = Price(input=base_in or Decimal(0), output=base_out or Decimal(0), cached_input=cached,
                  cache_write=write, cache_write_1h=write_1h, audio_input=audio_in, audio_output=audio_out)
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=parts[0],
                  cache_write_tokens=parts[1], cache_write_1h_tokens=parts[2], audio_input_tokens=parts[3],
                  audio_output_tokens=parts[4])
    assert 0 <= cost_pico(price, usage) <= worst_cost_pico(price, prompt, completion)
