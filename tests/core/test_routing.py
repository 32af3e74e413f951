"""Routing that survives real providers: transitive fallbacks, cooldowns, served-by headers.

Real gateways on sockets, fake upstreams that fail, stall or throttle, the official SDK.
"""

from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from nexgate_proxy.appkeys import STORE
from nexgate_proxy.config import ConfigError, parse_config
from nexgate_proxy.money import usd_to_pico
from nexgate_proxy.store import NewLedgerEntry
from nexgate_proxy.testing import Behaviour, FakeUpstream, RecordingPlugin, gateway_config

from .test_cli import nexgate

HI = [{"role": "user", "content": "hi"}]


def _with_upstreams(upstream: FakeUpstream, others: dict[str, FakeUpstream]) -> dict:
    config = gateway_config(upstream)
    for name, fake in others.items():
        config["providers"][name] = {"type": "openai", "base_url": fake.url, "api_key": "k"}
    return config


# ------------------------------------------------------------ transitive fallbacks

async def test_fallbacks_are_transitive_breadth_first_and_priced_by_the_model_that_served(
        upstream: FakeUpstream, start_gateway) -> None:
    async with FakeUpstream() as down_a, FakeUpstream() as down_b, FakeUpstream() as down_d:
        for fake in (down_a, down_b, down_d):
            fake.behaviour = Behaviour(status=503)
        config = _with_upstreams(upstream, {"pa": down_a, "pb": down_b, "pd": down_d})
        price = {"input": 1, "output": 2}
        config["models"].update({
            "a": {"route": [{"provider": "pa", "model": "ma"}], "fallbacks": ["b", "d"], "price": price},
            "b": {"route": [{"provider": "pb", "model": "mb"}], "fallbacks": ["c"], "price": price},
            "d": {"route": [{"provider": "pd", "model": "md"}], "fallbacks": ["c"], "price": price},  # a diamond
            "c": {"route": [{"provider": "fake", "model": "mc"}],
                  "price": {"input": 10, "output": 20}},
        })
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        await gw.app[STORE].apply_ledger_entry(NewLedgerEntry(
            account_id=gw.user_id, kind="grant", amount_pico=usd_to_pico(Decimal("1")), source="test", external_id="g"))
        reply = await gw.openai_client().chat.completions.create(model="a", messages=HI)
        assert reply.choices[0].message.content == "Hello from upstream"
        # a's own fallbacks first (b, d), then theirs (c): breadth-first, every target once.
        assert [len(f.received) for f in (down_a, down_b, down_d)] == [1, 1, 1]
        assert [r.body["model"] for r in upstream.received] == ["mc"]
        record = recorder.records[-1]
        assert (record.provider, record.upstream_model, record.attempts) == ("fake", "mc", 4)
        # Charged at c's price (the model that served): 11 input and 7 output tokens at $10 / $20 per 1M.
        assert record.actual_cost_pico == 11 * 10_000_000 + 7 * 20_000_000
        # The hold took the worst price of every target tried: 4096 output tokens (the default cap) at c's $20.
        assert record.estimated_cost_pico >= 4096 * 20_000_000


def test_a_fallback_cycle_fails_the_config_with_its_key_path() -> None:
    models = {
        "a": {"route": [{"provider": "p"}], "fallbacks": ["b"], "free": True},
        "b": {"route": [{"provider": "p"}], "fallbacks": ["c"], "free": True},
        "c": {"route": [{"provider": "p"}], "fallbacks": ["a"], "free": True},
        "d": {"route": [{"provider": "p"}], "fallbacks": ["e"], "free": True},
        "e": {"route": [{"provider": "p"}], "fallbacks": ["d"], "free": True},
        "f": {"route": [{"provider": "p"}], "fallbacks": ["a"], "free": True},  # leads into a cycle, is none
    }
    with pytest.raises(ConfigError) as raised:
        parse_config({"providers": {"p": {"type": "echo"}}, "models": models})
    cycles = [p for p in raised.value.problems if "cycle" in p]
    assert cycles == [
        "models.a.fallbacks: a -> b -> c -> a is a cycle (a model must not fall back to itself through other models)",
        "models.d.fallbacks: d -> e -> d is a cycle (a model must not fall back to itself through other models)",
    ]


def test_config_check_refuses_a_fallback_cycle(tmp_path: Path) -> None:
    (tmp_path / "nexgate.yaml").write_text(textwrap.dedent("""
        providers: {echo: {type: echo}}
        models:
          a: {route: [{provider: echo, model: x}], fallbacks: [b], free: true}
          b: {route: [{provider: echo, model: y}], fallbacks: [a], free: true}
    """))
    result = nexgate("config", "check", "nexgate.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "models.a.fallbacks: a -> b -> a is a cycle" in result.stdout + result.stderr
