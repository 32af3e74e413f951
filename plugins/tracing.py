"""OpenTelemetry traces, with the GenAI semantic conventions; off unless ``tracing.endpoint`` is set.

Needs the ``otel`` extra (``pip install 'nexgate[otel]'``: opentelemetry-sdk and
the OTLP/HTTP exporter); the default install has neither, and without an
endpoint this plugin takes its hooks out of the request path (``HookChain.unplug``).

Per proxied request: a SERVER span (its parent the client's ``traceparent``,
if any) named "{gen_ai.operation.name} {gen_ai.request.model}", with child
spans for the phases (``nexgate.auth``, ``nexgate.limits``, ``nexgate.credits``,
``nexgate.settle``) and a CLIENT span per upstream attempt, whose context goes
upstream as the W3C ``traceparent`` header. Attributes: ``gen_ai.operation.name``,
``gen_ai.request.model``, ``gen_ai.provider.name``, ``gen_ai.response.model``,
``gen_ai.usage.input_tokens`` / ``output_tokens``,
``gen_ai.server.request.duration`` and ``gen_ai.server.time_to_first_token``
(seconds), ``http.response.status_code``, ``error.type``, the request id.

Content capture is impossible: no hook here reads a body, and every span
passes a guard before export (``_GuardedExporter``): only the attribute names
in ``ALLOWED_ATTRIBUTES`` with numbers, booleans or short name-like strings,
and no events (an exception's message could quote a body) — a span that
breaks the rule is not exported and is counted in
``nexgate_tracing_spans_dropped_total``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Sequence

from aiohttp import web
from prometheus_client.core import CounterMetricFamily

from nexgate_proxy import RequestContext, StashKey, hookimpl
from nexgate_proxy.appkeys import CHAIN
from nexgate_proxy.config import Config, ConfigReader, ConfigSection, Target
from nexgate_proxy.plugins import PluginError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("nexgate.tracing")

OPERATIONS = {"chat.completions": "chat", "messages": "chat", "responses": "chat", "completions": "text_completion",
              "embeddings": "embeddings"}
ALLOWED_ATTRIBUTES = frozenset({
    "gen_ai.operation.name", "gen_ai.request.model", "gen_ai.provider.name", "gen_ai.response.model",
    "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.server.request.duration",
    "gen_ai.server.time_to_first_token", "http.response.status_code", "error.type", "nexgate.request_id",
    "nexgate.endpoint", "nexgate.provider", "nexgate.attempts", "nexgate.stream", "nexgate.cost_usd",
})
_SAFE_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")
"""What a string attribute may look like: a configured name, an id, a code. Never a sentence."""


@dataclass(frozen=True, slots=True)
class TracingSettings:
    endpoint: str = ""
    """The OTLP/HTTP traces endpoint, e.g. http://127.0.0.1:4318/v1/traces; "" = no tracing."""
    service_name: str = "nexgate"
    sample_ratio: float = 1.0


def parse_tracing_settings(r: ConfigReader, s: dict[str, Any], config: Config) -> TracingSettings:
    p = "tracing"
    d = TracingSettings()
    return TracingSettings(
        endpoint=r.value(s, "endpoint", p, str, d.endpoint,
                         lambda v: None if not v or v.startswith(("http://", "https://"))
                         else "must be an http(s) URL"),
        service_name=r.value(s, "service_name", p, str, d.service_name),
        sample_ratio=r.value(s, "sample_ratio", p, float, d.sample_ratio,
                             lambda v: None if 0 <= v <= 1 else "must be between 0 and 1"),
    )


TRACING_SECTION = ConfigSection("tracing", parse_tracing_settings, ("endpoint", "service_name", "sample_ratio"),
                                "OpenTelemetry traces (the otel extra): where to send them, how many.")


class TracingState:
    def __init__(self, settings: TracingSettings) -> None:
        self.settings = settings
        self.tracer: Any = None
        self.provider: Any = None
        self.dropped = 0
        self.exporter: SpanExporter | None = None


TRACING: web.AppKey[TracingState] = web.AppKey("nexgate_plugins.tracing", TracingState)
EXPORTER: web.AppKey[Any] = web.AppKey("nexgate_plugins.tracing.exporter")
"""Set (in a plugin's ``nexgate_register_routes``) to export spans there instead of OTLP: tests, embeddings."""
_ROOT: StashKey[Any] = StashKey("tracing.root")
_ATTEMPT: StashKey[Any] = StashKey("tracing.attempt")


def _clean(value: Any) -> bool:
    if isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, str) and _SAFE_TEXT.fullmatch(value) is not None


def span_is_clean(span: Any) -> bool:
    """Only allowed attribute names with number or name-like values, and no events."""
    if span.events:
        return False
    return all(key in ALLOWED_ATTRIBUTES and _clean(value) for key, value in (span.attributes or {}).items())


def _guarded(exporter: SpanExporter, state: TracingState) -> SpanExporter:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class _GuardedExporter(SpanExporter):
        """The redaction guard of traces: a span with anything but allowed metadata is not exported."""

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            clean = [span for span in spans if span_is_clean(span)]
            if len(clean) < len(spans):
                state.dropped += len(spans) - len(clean)
                log.error("tracing: %d span(s) with attributes or events outside the allowlist not exported",
                          len(spans) - len(clean))
            return exporter.export(clean) if clean else SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return exporter.force_flush(timeout_millis)

    return _GuardedExporter()


def _open(state: TracingState) -> None:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
    except ImportError:
        raise PluginError("tracing.endpoint is set but OpenTelemetry is not installed: "
                          "pip install 'nexgate[otel]'") from None
    settings = state.settings
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}),
                              sampler=ParentBasedTraceIdRatio(settings.sample_ratio))
    if state.exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(_guarded(state.exporter, state)))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(_guarded(OTLPSpanExporter(endpoint=settings.endpoint), state)))
    state.provider = provider
    state.tracer = provider.get_tracer("nexgate")


# ------------------------------------------------------------------- hooks


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [TRACING_SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    app[TRACING] = TracingState(config.section(TRACING_SECTION))


@hookimpl
async def nexgate_lifespan(app: web.Application, config: Config) -> AsyncIterator[None]:
    state = app[TRACING]
    state.exporter = app.get(EXPORTER)
    if not state.settings.endpoint and state.exporter is None:
        # Off: the per-attempt hooks leave the chain, so tracing costs nothing per request.
        app[CHAIN].unplug(__name__, "nexgate_upstream_attempt", "nexgate_upstream_done")
        yield
        return
    _open(state)
    providers = {name: p.type for name, p in config.providers.items()}
    _trace_phases(app, state, providers)
    yield
    state.provider.shutdown()  # exports what is buffered


@hookimpl
def nexgate_metrics(app: web.Application) -> Iterator[Any]:
    yield CounterMetricFamily("nexgate_tracing_spans_dropped", "Spans the guard kept from export (not metadata).",
                              value=app[TRACING].dropped)


@hookimpl
def nexgate_upstream_attempt(ctx: RequestContext, target: Target, headers: dict[str, str]) -> None:
    root = ctx.stash.get(_ROOT)
    if root is None:  # tracing off (or this request not traced)
        return
    from opentelemetry import trace
    from opentelemetry.propagate import inject

    state = ctx.app[TRACING]
    operation = OPERATIONS.get(ctx.endpoint, ctx.endpoint)
    span = state.tracer.start_span(f"{operation} {target.model}", context=trace.set_span_in_context(root),
                                   kind=trace.SpanKind.CLIENT, record_exception=False,
                                   set_status_on_exception=False, attributes={
                                       "gen_ai.operation.name": operation, "gen_ai.request.model": target.model,
                                       "gen_ai.provider.name": _provider_name(ctx, target),
                                       "nexgate.provider": target.provider})
    ctx.stash[_ATTEMPT] = span
    inject(headers, context=trace.set_span_in_context(span))  # W3C traceparent to the upstream


@hookimpl
def nexgate_upstream_done(ctx: RequestContext, target: Target, status: int, error_code: str | None) -> None:
    span = ctx.stash.pop(_ATTEMPT, None)
    if span is None:
        return
    if status:
        span.set_attribute("http.response.status_code", status)
    if error_code:
        span.set_attribute("error.type", error_code)
    span.end()


# ------------------------------------------------------------------ phases


def _provider_name(ctx: RequestContext, target: Target) -> str:
    """The semantic conventions' provider name: the provider's type (openai, anthropic, ...)."""
    return ctx.app[_PROVIDER_TYPES].get(target.provider, target.provider)


_PROVIDER_TYPES: web.AppKey[dict[str, str]] = web.AppKey("nexgate_plugins.tracing.providers", dict)


def _trace_phases(app: web.Application, state: TracingState, providers: dict[str, str]) -> None:
    """Wrap the hook chain's request phases in spans (only when tracing is on: off, nothing is wrapped)."""
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    app[_PROVIDER_TYPES] = providers
    chain = app[CHAIN]
    tracer = state.tracer
    server = trace.SpanKind.SERVER

    def child(name: str, phase: Callable[[RequestContext], Any]) -> Callable[[RequestContext], Any]:
        async def traced(ctx: RequestContext) -> Any:
            root = ctx.stash.get(_ROOT)
            if root is None:
                return await phase(ctx)
            with tracer.start_as_current_span(name, context=trace.set_span_in_context(root),
                                              record_exception=False, set_status_on_exception=False):
                return await phase(ctx)
        return traced

    authenticate = child("nexgate.auth", chain.authenticate)
    admit = child("nexgate.limits", chain.admit)
    reserve = child("nexgate.credits", chain.reserve)
    finish = chain.finish

    async def traced_authenticate(ctx: RequestContext) -> Any:
        operation = OPERATIONS.get(ctx.endpoint, ctx.endpoint)
        # The client's traceparent (if any) is the parent; its other headers are not read.
        carrier = {k: v for k in ("traceparent", "tracestate") if (v := ctx.headers.get(k)) is not None}
        ctx.stash[_ROOT] = tracer.start_span(
            operation, context=extract(carrier), kind=server, record_exception=False,
            set_status_on_exception=False,
            attributes={"gen_ai.operation.name": operation, "nexgate.request_id": ctx.request_id,
                        "nexgate.endpoint": ctx.endpoint})
        return await authenticate(ctx)

    async def traced_finish(ctx: RequestContext) -> None:
        root = ctx.stash.get(_ROOT)
        if root is None:
            return await finish(ctx)
        with tracer.start_as_current_span("nexgate.settle", context=trace.set_span_in_context(root),
                                          record_exception=False, set_status_on_exception=False):
            await finish(ctx)
        operation = OPERATIONS.get(ctx.endpoint, ctx.endpoint)
        attributes: dict[str, Any] = {"http.response.status_code": ctx.status, "nexgate.attempts": ctx.attempts,
                                      "nexgate.stream": ctx.stream,
                                      "gen_ai.server.request.duration": perf_counter() - ctx.started}
        if ctx.route is not None and ctx.model:
            attributes["gen_ai.request.model"] = ctx.model
            root.update_name(f"{operation} {ctx.model}")
        target = ctx.target
        if target is not None:
            attributes.update({"gen_ai.provider.name": _provider_name(ctx, target), "nexgate.provider": target.provider,
                               "gen_ai.response.model": target.model,
                               "gen_ai.usage.input_tokens": ctx.usage.prompt_tokens,
                               "gen_ai.usage.output_tokens": ctx.usage.completion_tokens})
        if ctx.first_chunk_at:
            attributes["gen_ai.server.time_to_first_token"] = ctx.first_chunk_at - ctx.started
        if ctx.error_code:
            attributes["error.type"] = ctx.error_code
        if ctx.actual_cost_pico is not None:
            attributes["nexgate.cost_usd"] = ctx.actual_cost_pico / 10**12
        root.set_attributes(attributes)
        root.end()

    chain.authenticate = traced_authenticate  # type: ignore[method-assign]
    chain.admit = admit  # type: ignore[method-assign]
    chain.reserve = reserve  # type: ignore[method-assign]
    chain.finish = traced_finish  # type: ignore[method-assign]
