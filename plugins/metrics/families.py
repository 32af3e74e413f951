"""What the gateway counts per request, in plain Python, turned into metric families at a scrape.

prometheus_client's labelled children take a lock per increment (a dozen per
request here); the event loop is the only writer, so the counts are plain ints
and floats, and a scrape builds the usual families from them.

Every label value comes from a fixed set or from the config (endpoint names,
configured model aliases and providers, status codes, error codes NexGate
sets): never a key, user, org, IP, request id or text a client typed.
"""

from __future__ import annotations

from bisect import bisect_left
from time import perf_counter
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from nexgate_proxy import UsageRecord
from nexgate_proxy.money import PICO_PER_USD

if TYPE_CHECKING:
    from nexgate_proxy.config import Target
    from nexgate_proxy.context import RequestContext

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
"""Request, upstream and first-token times (seconds)."""
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 1)
"""The gateway's own time per request: fine below a millisecond, where a healthy gateway sits."""
PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

REJECTION_REASONS: dict[str, str] = {
    **dict.fromkeys(("missing_api_key", "invalid_api_key", "model_not_allowed", "key_verification_limited",
                     "auth_busy", "auth_unavailable"), "auth"),
    **dict.fromkeys(("rate_limit_requests", "rate_limit_tokens", "concurrency_limit", "rate_limit_unavailable"),
                    "rate_limit"),
    **dict.fromkeys(("insufficient_credits", "credits_unavailable"), "credits"),
    **dict.fromkeys(("ip_rate_limit", "ip_not_allowed", "ip_banned"), "ip"),
    **dict.fromkeys(("invalid_json", "missing_required_parameter", "invalid_type", "model_not_found",
                     "unsupported_endpoint", "request_too_large", "invalid_body", "invalid_body_encoding",
                     "unsupported_body_encoding", "request_timeout"), "validation"),
}
"""Error codes of requests NexGate refused before (or instead of) an upstream, by reason.
A 4xx with another code (a third-party plugin's) counts as "other"."""

_STATUS_CLASS = {n: f"{n}xx" for n in range(1, 6)}


class Histogram:
    """Bucket counts and a sum; ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def add_to(self, family: HistogramMetricFamily, labels: tuple[str, ...]) -> None:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric(labels, buckets, self.total)


class _Served:
    """What one (endpoint, model, provider, status) has seen: counters from usage records."""

    __slots__ = ("requests", "prompt", "completion", "cached", "cost_pico")

    def __init__(self) -> None:
        self.requests = self.prompt = self.completion = self.cached = self.cost_pico = 0


class _Timed:
    """The times of one (endpoint, model, provider): from the request context at settle."""

    __slots__ = ("duration", "upstream", "overhead", "ttft")

    def __init__(self) -> None:
        self.duration = Histogram(LATENCY_BUCKETS)
        self.upstream = Histogram(LATENCY_BUCKETS)
        self.overhead = Histogram(OVERHEAD_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)


class GatewayMetrics:
    def __init__(self) -> None:
        self._served: dict[tuple[str, str, str, int], _Served] = {}
        self._timed: dict[tuple[str, str, str], _Timed] = {}
        self.rejections = dict.fromkeys(("auth", "rate_limit", "credits", "ip", "validation", "other"), 0)
        self._attempts: dict[tuple[str, str, str], int] = {}
        """(provider, target model, status class or "none") -> upstream attempts."""
        self._upstream_errors: dict[tuple[str, str, str], int] = {}
        """(provider, target model, error code) -> failed attempts."""
        self.in_flight = 0
        self.open_streams = 0
        self.probe_up: dict[str, int] = {}
        self.probe_latency: dict[str, Histogram] = {}

    # ------------------------------------------------------ request path

    def started(self) -> None:
        self.in_flight += 1

    def settled(self, ctx: RequestContext) -> None:
        """The request's times: total, waiting on upstreams, the rest (NexGate's own), first chunk."""
        now = perf_counter()
        self.in_flight -= 1
        target = ctx.target
        key = (ctx.endpoint, ctx.model if ctx.route is not None else "-", target.provider if target else "-")
        timed = self._timed.get(key)
        if timed is None:
            timed = self._timed[key] = _Timed()
        started = ctx.started
        total = now - started
        timed.duration.observe(total)
        if ctx.attempts:  # overhead only where an upstream was called: a refusal is all overhead
            timed.upstream.observe(ctx.upstream_wait)
            timed.overhead.observe(max(total - ctx.upstream_wait, 0.0))
        if ctx.first_chunk_at:
            timed.ttft.observe(ctx.first_chunk_at - started)
            self.open_streams -= 1

    def attempt_done(self, ctx: RequestContext, target: Target, status: int, error_code: str | None) -> None:
        if ctx.first_chunk_at:  # a stream is relayed from here until it settles
            self.open_streams += 1
        status_class = _STATUS_CLASS.get(status // 100, "none")
        key = (target.provider, target.model, status_class)
        self._attempts[key] = self._attempts.get(key, 0) + 1
        if error_code is not None and error_code != "client_disconnected":  # not the upstream's failure
            key = (target.provider, target.model, error_code)
            self._upstream_errors[key] = self._upstream_errors.get(key, 0) + 1

    def observe(self, record: UsageRecord) -> None:
        key = (record.endpoint, record.model or "-", record.provider or "-", record.status)
        served = self._served.get(key)
        if served is None:
            served = self._served[key] = _Served()
        served.requests += 1
        served.prompt += record.prompt_tokens
        served.completion += record.completion_tokens
        served.cached += record.cached_tokens
        if record.actual_cost_pico:
            served.cost_pico += record.actual_cost_pico
        if record.status >= 400 and not record.attempts and record.status != 499:
            reason = REJECTION_REASONS.get(record.error_code or "", "other" if record.status < 500 else "")
            if reason:
                self.rejections[reason] += 1

    def probed(self, component: str, ok: bool, seconds: float) -> None:
        self.probe_up[component] = int(ok)
        histogram = self.probe_latency.get(component)
        if histogram is None:
            histogram = self.probe_latency[component] = Histogram(PROBE_BUCKETS)
        if ok:
            histogram.observe(seconds)

    # ------------------------------------------------------------ scrape

    def families(self) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "nexgate_requests", "Proxied requests by endpoint, model alias, provider and status.",
            labels=("endpoint", "model", "provider", "status", "status_class"))
        tokens = CounterMetricFamily("nexgate_tokens", "Tokens by model alias and provider (cached: of prompt).",
                                     labels=("model", "provider", "kind"))
        cost = CounterMetricFamily("nexgate_cost_usd", "What requests were charged, in US dollars.",
                                   labels=("model", "provider"))
        by_model: dict[tuple[str, str], list[int]] = {}
        for (endpoint, model, provider, status), s in list(self._served.items()):
            requests.add_metric((endpoint, model, provider, str(status), _STATUS_CLASS.get(status // 100, "other")),
                                s.requests)
            totals = by_model.setdefault((model, provider), [0, 0, 0, 0])
            totals[0] += s.prompt
            totals[1] += s.completion
            totals[2] += s.cached
            totals[3] += s.cost_pico
        for (model, provider), (prompt, completion, cached, pico) in by_model.items():
            tokens.add_metric((model, provider, "prompt"), prompt)
            tokens.add_metric((model, provider, "completion"), completion)
            tokens.add_metric((model, provider, "cached"), cached)
            cost.add_metric((model, provider), pico / PICO_PER_USD)
        yield requests
        yield tokens
        yield cost
        yield from self._time_families()
        rejections = CounterMetricFamily("nexgate_rejections", "Requests NexGate refused itself, by reason.",
                                         labels=("reason",))
        for reason, n in self.rejections.items():
            rejections.add_metric((reason,), n)
        yield rejections
        attempts = CounterMetricFamily("nexgate_upstream_attempts", "Requests sent to upstream targets, by the "
                                       "status class of their answer (none: no answer).",
                                       labels=("provider", "upstream_model", "status_class"))
        for labels, n in list(self._attempts.items()):
            attempts.add_metric(labels, n)
        yield attempts
        errors = CounterMetricFamily("nexgate_upstream_errors", "Failed upstream attempts by target and error.",
                                     labels=("provider", "upstream_model", "code"))
        for labels, n in list(self._upstream_errors.items()):
            errors.add_metric(labels, n)
        yield errors
        yield GaugeMetricFamily("nexgate_in_flight_requests", "Proxied requests being handled.",
                                value=self.in_flight)
        yield GaugeMetricFamily("nexgate_open_streams", "Streams being relayed to clients.",
                                value=self.open_streams)
        up = GaugeMetricFamily("nexgate_dependency_up", "1 while the last probe of a dependency answered.",
                               labels=("component",))
        latency = HistogramMetricFamily("nexgate_dependency_latency_seconds",
                                        "Round trips of the periodic probes of the store and the shared state.",
                                        labels=("component",))
        for component, ok in list(self.probe_up.items()):
            up.add_metric((component,), ok)
            self.probe_latency[component].add_to(latency, (component,))
        yield up
        yield latency

    def _time_families(self) -> Iterator[Any]:
        duration = HistogramMetricFamily("nexgate_request_duration_seconds",
                                         "Time from the request's first byte to its settlement.",
                                         labels=("endpoint", "model", "provider"))
        upstream = HistogramMetricFamily("nexgate_upstream_duration_seconds",
                                         "Time a request waited on upstreams (every attempt, a stream's chunks).",
                                         labels=("model", "provider"))
        overhead = HistogramMetricFamily("nexgate_gateway_overhead_seconds",
                                         "Request duration minus the time waiting on upstreams: what NexGate "
                                         "itself adds (requests that reached an upstream).",
                                         labels=("endpoint", "provider"))
        ttft = HistogramMetricFamily("nexgate_time_to_first_token_seconds",
                                     "Time from the request to the first bytes of its stream from the upstream.",
                                     labels=("model", "provider"))
        by_model: dict[tuple[str, str], tuple[Histogram, Histogram]] = {}
        by_endpoint: dict[tuple[str, str], Histogram] = {}
        for (endpoint, model, provider), t in list(self._timed.items()):
            t.duration.add_to(duration, (endpoint, model, provider))
            up, first = by_model.setdefault((model, provider), (Histogram(LATENCY_BUCKETS), Histogram(LATENCY_BUCKETS)))
            _merge(up, t.upstream)
            _merge(first, t.ttft)
            _merge(by_endpoint.setdefault((endpoint, provider), Histogram(OVERHEAD_BUCKETS)), t.overhead)
        for labels, (up, first) in by_model.items():
            if labels[1] != "-":
                up.add_to(upstream, labels)
            if sum(first.counts):
                first.add_to(ttft, labels)
        for labels, histogram in by_endpoint.items():
            if labels[1] != "-":
                histogram.add_to(overhead, labels)
        yield duration
        yield upstream
        yield overhead
        yield ttft


def _merge(into: Histogram, other: Histogram) -> None:
    for i, count in enumerate(other.counts):
        into.counts[i] += count
    into.total += other.total
