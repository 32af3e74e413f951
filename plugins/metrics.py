"""Prometheus metrics at ``GET /metrics``, fed from usage records only.

Labels come from configured model aliases and status codes, never from what a
client typed, so cardinality stays bounded and no content reaches a label.

Every plugin (this one included, third-party ones alike) exports its families
through the ``nexgate_metrics`` hook, which a scrape calls.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from nexgate_proxy import UsageRecord, hookimpl
from nexgate_proxy.abuse import request_ip
from nexgate_proxy.appkeys import ABUSE, CHAIN
from nexgate_proxy.config import Config


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BUCKETS_MS = tuple(bound * 1000 for bound in _LATENCY_BUCKETS)


class _Series:
    """What one (endpoint, model, status) has seen: plain ints, read when /metrics is scraped."""

    __slots__ = ("requests", "prompt_tokens", "completion_tokens", "latency_ms_sum", "latency_counts")

    def __init__(self) -> None:
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency_ms_sum = 0
        self.latency_counts = [0] * (len(_BUCKETS_MS) + 1)  # the last one is +Inf


class GatewayMetrics:
    """Request, token and latency metrics, counted in plain Python per request.

    prometheus_client's labelled children take a lock per increment (several per
    request); the event loop is the only writer here, so the counts are plain
    ints and a collector turns them into the usual families when scraped.
    """

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, int], _Series] = {}

    def observe(self, record: UsageRecord) -> None:
        key = (record.endpoint, record.model or "-", record.status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.requests += 1
        series.prompt_tokens += record.prompt_tokens
        series.completion_tokens += record.completion_tokens
        series.latency_ms_sum += record.latency_ms
        series.latency_counts[bisect_left(_BUCKETS_MS, record.latency_ms)] += 1

    def families(self) -> Iterator[Any]:
        requests = CounterMetricFamily("nexgate_requests", "Proxied requests by outcome.",
                                       labels=("endpoint", "model", "status"))
        tokens = CounterMetricFamily("nexgate_tokens", "Tokens reported by upstreams.", labels=("model", "kind"))
        latency = HistogramMetricFamily("nexgate_request_duration_seconds", "Time from request to last byte.",
                                        labels=("endpoint",))
        by_model: dict[str, list[int]] = {}
        by_endpoint: dict[str, tuple[list[int], list[int]]] = {}
        for (endpoint, model, status), series in list(self._series.items()):
            requests.add_metric((endpoint, model, str(status)), series.requests)
            totals = by_model.setdefault(model, [0, 0])
            totals[0] += series.prompt_tokens
            totals[1] += series.completion_tokens
            counts, latency_sum = by_endpoint.setdefault(endpoint, ([0] * len(series.latency_counts), [0]))
            for i, count in enumerate(series.latency_counts):
                counts[i] += count
            latency_sum[0] += series.latency_ms_sum
        for model, (prompt, completion) in by_model.items():
            tokens.add_metric((model, "prompt"), prompt)
            tokens.add_metric((model, "completion"), completion)
        for endpoint, (counts, latency_sum) in by_endpoint.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, _LATENCY_BUCKETS), "+Inf"), counts):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric((endpoint,), buckets, latency_sum[0] / 1000)
        yield requests
        yield tokens
        yield latency


METRICS: web.AppKey[GatewayMetrics] = web.AppKey("nexgate_plugins.metrics", GatewayMetrics)


class _Scrape:
    """What ``generate_latest`` reads (it only calls ``collect``): every plugin's ``nexgate_metrics`` families."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> list[Any]:
        return self._app[CHAIN].metrics(self._app)


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    app[METRICS] = GatewayMetrics()
    app.router.add_get("/metrics", _metrics)


@hookimpl
def nexgate_metrics(app: web.Application) -> Iterator[Any]:
    return app[METRICS].families()


@hookimpl
def nexgate_record(record: UsageRecord, app: web.Application) -> None:
    app[METRICS].observe(record)


async def _metrics(request: web.Request) -> web.Response:
    guard = request.app.get(ABUSE)
    refusal = guard.check(request_ip(request)) if guard is not None else None
    if refusal is not None:  # the gateway's IP lists and bans hold here too
        return refusal.response()
    body = generate_latest(_Scrape(request.app))  # type: ignore[arg-type]
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
