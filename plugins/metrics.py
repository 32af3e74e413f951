"""Prometheus metrics at ``GET /metrics``, fed from usage records only.

Labels come from configured model aliases and status codes, never from what a
client typed, so cardinality stays bounded and no content reaches a label.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from nexgate_proxy import UsageRecord, hookimpl
from nexgate_proxy.config import Config


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("nexgate_requests", "Proxied requests by outcome.",
                                ("endpoint", "model", "status"), registry=self.registry)
        self.tokens = Counter("nexgate_tokens", "Tokens reported by upstreams.",
                              ("model", "kind"), registry=self.registry)
        self.latency = Histogram("nexgate_request_duration_seconds", "Time from request to last byte.",
                                 ("endpoint",), registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

        # Labelled children by label values: .labels() costs a lock and a tuple per call.
        self._children: dict[tuple[str, str, int], tuple] = {}

    def observe(self, record: UsageRecord) -> None:
        key = (record.endpoint, record.model or "-", record.status)
        children = self._children.get(key)
        if children is None:
            endpoint, model, status = key
            children = self._children[key] = (
                self.requests.labels(endpoint, model, str(status)), self.latency.labels(endpoint),
                self.tokens.labels(model, "prompt"), self.tokens.labels(model, "completion"))
        requests, latency, prompt, completion = children
        requests.inc()
        latency.observe(record.latency_ms / 1000)
        if record.prompt_tokens:
            prompt.inc(record.prompt_tokens)
        if record.completion_tokens:
            completion.inc(record.completion_tokens)


METRICS: web.AppKey[GatewayMetrics] = web.AppKey("nexgate_plugins.metrics", GatewayMetrics)


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    app[METRICS] = GatewayMetrics()
    app.router.add_get("/metrics", _metrics)


@hookimpl
def nexgate_record(record: UsageRecord, app: web.Application) -> None:
    app[METRICS].observe(record)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
