"""examples/observability: the Grafana dashboard loads, and it and the alerts use only metrics a scrape has."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from nexgate_proxy.testing import FakeUpstream, gateway_config

from .scrape import scrape_text

EXAMPLES = Path(__file__).parents[3] / "examples" / "observability"
PROVIDED_BY_OTHER_BRANCHES: set[str] = set()
"""Metrics the examples may reference before the branch exporting them is merged (none now: the routing
breakers, `nexgate_target_breaker_state`, are in). The test fails once a scrape has one of them."""
_METRIC = re.compile(r"\bnexgate_[a-z0-9_]+")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def referenced(text: str) -> set[str]:
    names = set()
    for name in _METRIC.findall(text):
        for suffix in _SUFFIXES:
            name = name.removesuffix(suffix)
        names.add(name)
    return names


def test_the_dashboard_has_grafanas_shape() -> None:
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    assert isinstance(dashboard["title"], str) and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] in {"timeseries", "stat", "gauge", "table", "state-timeline"} and panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "xywh") and grid["x"] + grid["w"] <= 24
        assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"])
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("overhead", "first token", "error ratio", "spend", "breaker", "outbox"):
        assert topic in titles


def test_the_alert_rules_have_prometheus_shape() -> None:
    rules = yaml.safe_load((EXAMPLES / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert {"NexGateOverheadHigh", "NexGateUpstreamErrorRatioHigh", "NexGateOutboxBacklogGrowing",
            "NexGateStateStoreDown"} <= set(alerts)
    assert all(rule["expr"] and rule["labels"]["severity"] for rule in alerts.values())
    scrape = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    assert scrape["rule_files"] == ["alerts.yml"] and scrape["scrape_configs"][0]["metrics_path"] == "/metrics"


async def test_every_metric_the_examples_use_is_in_a_real_scrape(upstream: FakeUpstream, start_gateway,
                                                                 redis_url: str) -> None:
    gw = await start_gateway(gateway_config(upstream, state={"url": redis_url}, metrics={"probe_interval": 0.05}))
    await gw.openai_client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    await asyncio.sleep(0.3)  # a probe of the store and of the state
    families = {f.name for f in text_string_to_metric_families(await scrape_text(gw.url))}
    used = referenced((EXAMPLES / "grafana-dashboard.json").read_text()) | referenced(
        (EXAMPLES / "alerts.yml").read_text())
    assert "nexgate_gateway_overhead_seconds" in used
    assert used - families == PROVIDED_BY_OTHER_BRANCHES
    assert not PROVIDED_BY_OTHER_BRANCHES & families, "exported now: drop it from PROVIDED_BY_OTHER_BRANCHES"
