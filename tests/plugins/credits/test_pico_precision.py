"""Holds and the cached balance are exact at the ledger's precision: sub-nano prices keep serving."""

from __future__ import annotations

import secrets

import openai
import pytest

from nexgate_plugins.credits.holds.redis import RedisCreditState
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.money import format_usd
from nexgate_proxy.store import NewLedgerEntry
from nexgate_proxy.testing import FakeUpstream, gateway_config

# The fake upstream reports 11 prompt and 7 completion tokens: 11 x 3 + 7 x 6 = 75 pico-USD a call.
PRICE = {"input": "0.000003", "output": "0.000006"}
PER_CALL = 75


@pytest.mark.parametrize("state", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_75_pico_model_keeps_serving_while_the_ledger_covers_it(upstream: FakeUpstream, start_gateway,
                                                                       redis_url: str, state: str) -> None:
    config = gateway_config(upstream)
    config["models"]["gpt-cheap"] = {"route": [{"provider": "fake", "model": "upstream-model"}], "price": PRICE}
    if state == "redis":
        config["state"] = {"url": redis_url}
    gw = await start_gateway(config)
    granted = 100 * PER_CALL + 150  # room for the last call's hold: its worst case, not its cost
    await gw.app[STORE].apply_ledger_entry(NewLedgerEntry(gw.user_id, "grant", granted, "test", "g-1"))
    client = gw.openai_client()
    served = 0
    with pytest.raises(openai.APIStatusError) as refused:
        while True:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-cheap", max_tokens=7, messages=[{"role": "user", "content": "hi"}])
            assert raw.headers["x-nexgate-cost-usd"] == format_usd(PER_CALL)
            served += 1
            assert served < 200
    left = granted - served * PER_CALL
    assert served >= 100 and 0 <= left < 150  # every call the ledger covered was served
    assert refused.value.status_code == 402
    # The real available balance, to the pico-dollar (it used to say "$0").
    assert f"your available balance is ${format_usd(left)}." in refused.value.message


@pytest.mark.redis
async def test_redis_holds_are_exact_beyond_what_a_lua_number_holds(redis_url: str) -> None:
    state = RedisCreditState(redis_url, prefix=f"nexgate:test:{secrets.token_hex(4)}")
    balance = 2**53 * 1000 + 7  # about 9 billion USD... in pico, far past a double's exact integers

    async def load() -> int:
        return balance

    try:
        first = await state.reserve("acct", "r1", balance - 75, 0, 60, load)
        assert first.ok and first.available_pico == 75
        assert (await state.reserve("acct", "r2", 75, 0, 60, load)).ok
        refused = await state.reserve("acct", "r3", 1, 0, 60, load)
        assert not refused.ok and refused.available_pico == 0
        state.settle("acct", "r2", 74)  # one pico-dollar of r2's hold comes back
        assert (await state.reserve("acct", "r3", 1, 0, 60, load)).ok
        assert not (await state.reserve("acct", "r4", 1, 0, 60, load)).ok
        state.settle("acct", "r1", 0)
        state.settle("acct", "r3", 1)
        assert await state.available("acct") == balance - 75
    finally:
        await state.close()


def test_config_check_lists_unknown_keys_and_price_problems_together(tmp_path) -> None:
    import subprocess
    import sys

    path = tmp_path / "nexgate.yaml"
    path.write_text("providers: {echo: {type: echo}}\n"
                    "credits: {overdraft: 1}\n"
                    "colour: red\n"
                    "models: {m: {route: [{provider: echo}], price: {input: \"0.00000010\", output: 1e-7}}}\n")
    result = subprocess.run([sys.executable, "-m", "nexgate_proxy.cli", "config", "check", str(path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "credits.overdraft: unknown key; did you mean 'overdraft_usd'?" in result.stderr
    assert "colour: unknown key" in result.stderr
    # Both of the price's problems, in one pass, in plain notation (YAML reads an unquoted 1e-7 as text).
    assert "price.input: 0.00000010 has more than 6 decimals" in result.stderr
    assert "price.output: 0.0000001 has more than 6 decimals" in result.stderr
    assert "E-7" not in result.stderr
