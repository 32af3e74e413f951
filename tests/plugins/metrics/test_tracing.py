"""Traces with an in-memory exporter: the spans and GenAI attributes, traceparent upstream, no content."""

from __future__ import annotations

import secrets
from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from nexgate_plugins.tracing import ALLOWED_ATTRIBUTES, EXPORTER, TRACING, span_is_clean
from nexgate_proxy import hookimpl
from nexgate_proxy.appkeys import CHAIN
from nexgate_proxy.testing import Behaviour, FakeUpstream, gateway_config


class InMemoryTraces:
    """Points the tracing plugin at an in-memory exporter (set before the gateway starts)."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()

    @hookimpl
    def nexgate_register_routes(self, app: Any) -> None:
        app[EXPORTER] = self.exporter

    def spans(self) -> list[Any]:
        return list(self.exporter.get_finished_spans())


async def test_a_request_is_traced_with_genai_attributes_and_its_context_goes_upstream(
        upstream: FakeUpstream, start_gateway) -> None:
    canary = f"ZqTRACE{secrets.token_hex(6)}"
    traces = InMemoryTraces()
    gw = await start_gateway(gateway_config(upstream), plugins=[traces])
    upstream.behaviour = Behaviour(words=["echo", canary])
    client = gw.openai_client()
    await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": canary}])
    async for _chunk in await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": canary}], stream=True):
        pass
    spans = traces.spans()
    names = [s.name for s in spans]
    assert names.count("chat gpt-test") == 2  # the SERVER spans
    assert names.count("chat upstream-model") == 2  # one CLIENT span per attempt
    for phase in ("nexgate.auth", "nexgate.limits", "nexgate.credits", "nexgate.settle"):
        assert names.count(phase) == 2, phase
    root = next(s for s in spans if s.name == "chat gpt-test" and s.attributes.get("nexgate.stream"))
    attrs = root.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "gpt-test"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.response.model"] == "upstream-model"
    assert attrs["gen_ai.usage.input_tokens"] == 11
    assert attrs["gen_ai.usage.output_tokens"] == 2
    assert attrs["http.response.status_code"] == 200
    assert 0 < attrs["gen_ai.server.time_to_first_token"] <= attrs["gen_ai.server.request.duration"]
    attempt = next(s for s in spans if s.name == "chat upstream-model" and s.context.trace_id == root.context.trace_id)
    assert attempt.parent.span_id == root.context.span_id
    # The attempt's context went upstream as W3C traceparent, with NexGate's request id.
    sent = {k.lower(): v for k, v in upstream.received[-1].headers.items()}
    version, trace_id, span_id, flags = sent["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{root.context.trace_id:032x}", f"{attempt.context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled
    assert sent["x-request-id"] == attrs["nexgate.request_id"]
    # Nothing but metadata: the canary is in no attribute, and no span has events.
    for span in spans:
        assert span_is_clean(span)
        assert set(span.attributes) <= ALLOWED_ATTRIBUTES
        assert canary not in repr(dict(span.attributes)) and canary not in span.name


async def test_a_span_with_content_is_not_exported(upstream: FakeUpstream, start_gateway) -> None:
    traces = InMemoryTraces()

    class Careless:
        """A third-party plugin that puts the prompt on the current span."""

        @hookimpl
        def nexgate_admit(self, ctx: Any) -> None:
            from opentelemetry import trace

            trace.get_current_span().set_attribute("prompt", str(ctx.body))
            trace.get_current_span().add_event("prompt seen", {"text": str(ctx.body)})

    gw = await start_gateway(gateway_config(upstream), plugins=[traces, Careless()])
    await gw.openai_client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    names = [s.name for s in traces.spans()]
    assert "nexgate.limits" not in names  # the span the plugin spoiled is dropped, the others stay
    assert "chat gpt-test" in names
    assert gw.app[TRACING].dropped == 1


async def test_without_an_endpoint_nothing_is_traced(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream))
    await gw.openai_client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    sent = {k.lower() for k in upstream.received[-1].headers}
    assert "traceparent" not in sent and "x-request-id" in sent
    assert gw.app[TRACING].tracer is None
    assert "authenticate" not in vars(gw.app[CHAIN])  # the phases are not wrapped: no cost when off
