"""Routing: model alias -> ordered upstream targets, from the YAML routing table.

Each model orders its own targets by its ``strategy``:

- ``weighted`` (the default): a weighted random order, spreading load by weight;
- ``priority``: the order of its ``route`` list, the first healthy one serves;
- ``least-latency``: the lowest moving average of time to first byte first (a target
  never measured goes first, so every one gets measured); one request in
  ``EXPLORE`` takes the weighted order instead, so a slow target that recovered is noticed;
- ``lowest-cost``: the cheapest price (input + output per 1M tokens) first; ties weighted.

Then come the targets of each model its fallbacks reach, transitively and
breadth-first (``ModelRoute.chain``: its own fallbacks in order, then theirs). A
client may name its own ordered fallbacks in the body, ``models: [...]``
(OpenRouter's convention), among the models its key may use: they come right after
the model asked for, before the configured fallbacks. Each target (provider +
upstream model) is tried at most once (retries aside). Only targets whose provider
serves the operation are kept (``Provider.supports``: in its own dialect, or through
a translation, Chat Completions <-> Anthropic Messages), so a fallback may cross
dialects. The proxy skips targets cooling down or at their rpm/tpm cap.

With ``state.url`` on Redis the circuit breakers are shared: this plugin hands the
proxy's breakers the bus, so openings and closings reach every instance.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any, AsyncIterator, Iterator

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nexgate_proxy import GatewayError, RequestContext, hookimpl
from nexgate_proxy.appkeys import BUS, CONFIG, PROVIDERS, PROXY, REDIS
from nexgate_proxy.config import Config, ModelRoute, Target
from nexgate_proxy.cooldown import Cooldowns, TargetKey
from nexgate_proxy.targetstats import TargetStats

EXPLORE = 0.05
"""Share of least-latency requests that take the weighted order (to keep measuring every target)."""
BREAKER_EVENT = "breaker"
"""Bus messages: ``[provider, model, seconds]``, an opening (its cooldown) or a closing (0)."""


def weighted_order(targets: tuple[Target, ...], rand: random.Random | None = None) -> list[Target]:
    """A random permutation in which a target comes first with probability weight / total."""
    if len(targets) == 1:
        return [targets[0]]
    r = rand or random
    # Efraimidis-Spirakis: sort by u^(1/w); the order of picks is a weighted sample without replacement.
    return sorted(targets, key=lambda t: r.random() ** (1.0 / t.weight), reverse=True)


def ordered_targets(route: ModelRoute, stats: TargetStats, rand: random.Random | None = None) -> list[Target]:
    """``route``'s own targets in the order its strategy picks."""
    targets = route.targets
    strategy = route.strategy
    if strategy == "priority" or len(targets) == 1:
        return list(targets)
    if strategy == "lowest-cost":  # a stable sort: equal prices keep the weighted order
        return sorted(weighted_order(targets, rand), key=_price_of)
    if strategy == "least-latency" and (rand or random).random() >= EXPLORE:
        ttfb = stats.ttfb
        return sorted(weighted_order(targets, rand), key=lambda t: ttfb.get((t.provider, t.model), 0.0))
    return weighted_order(targets, rand)


def _price_of(target: Target) -> Any:
    price = target.price
    return 0 if price is None else price.input + price.output


@hookimpl(trylast=True)
def nexgate_route(ctx: RequestContext) -> list[Target] | None:
    config = ctx.app[CONFIG]
    route = config.models.get(ctx.model or "")
    if route is None:
        raise GatewayError(404, f"The model `{ctx.model}` does not exist or you do not have access to it.",
                           code="model_not_found", param="model")
    chain = route.chain
    body = ctx.body
    if body is not None and "models" in body:
        chain = _client_chain(ctx, config, route, body["models"])
    providers = ctx.app[PROVIDERS]
    stats = ctx.app[PROXY].stats
    endpoint_format = ctx.api_format
    ordered: list[Target] = []
    seen: set[tuple[str, str]] = set()
    for alias in chain:
        for target in ordered_targets(config.models[alias], stats):
            key = (target.provider, target.model)
            if key not in seen and providers[target.provider].supports(ctx.endpoint, endpoint_format):
                seen.add(key)
                ordered.append(target)
    if not ordered:
        raise GatewayError(400, f"The model `{ctx.model}` cannot serve {ctx.request.path}.",
                           code="unsupported_endpoint", param="model")
    ctx.route = route
    return ordered


MAX_CLIENT_MODELS = 16


def _client_chain(ctx: RequestContext, config: Config, route: ModelRoute, models: Any) -> tuple[str, ...]:
    """The model asked for, the client's ``models`` in order, then everyone's configured fallbacks."""
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise GatewayError(400, "The models parameter must be a list of model names.", code="invalid_type",
                           param="models")
    if len(models) > MAX_CLIENT_MODELS:
        raise GatewayError(400, f"The models parameter names at most {MAX_CLIENT_MODELS} models.",
                           code="invalid_value", param="models")
    allowed = ctx.identity.allowed_models if ctx.identity is not None else None
    for name in models:
        if name not in config.models:
            raise GatewayError(404, f"The model `{name}` in models does not exist or you do not have access to it.",
                               code="model_not_found", param="models")
        if allowed is not None and name not in allowed:
            raise GatewayError(403, f"This API key may not use the model `{name}` (in models).",
                               code="model_not_allowed", param="models")
    chain = [route.alias]
    chain += [m for m in models if m not in chain]
    for name in chain:  # grows while it is walked: breadth-first, as ModelRoute.chain
        chain += [f for f in config.models[name].fallbacks if f not in chain]
    return tuple(chain)


# ---------------------------------------------------------- shared breakers


@hookimpl
async def nexgate_lifespan(app: web.Application) -> AsyncIterator[None]:
    health = app[PROXY].health
    if REDIS not in app or not isinstance(health, Cooldowns):
        yield  # one instance: its breakers stay in process
        return
    bus = app[BUS]
    pending: set[asyncio.Task[bool]] = set()

    def announce(key: TargetKey, seconds: float) -> None:
        task = asyncio.get_running_loop().create_task(
            bus.publish(BREAKER_EVENT, json.dumps([key[0], key[1], round(seconds, 3)])))
        pending.add(task)
        task.add_done_callback(pending.discard)

    def learn(kind: str, value: str) -> None:
        if kind != BREAKER_EVENT:
            return
        try:
            provider, model, seconds = json.loads(value)
            key = (str(provider), str(model))
            seconds = float(seconds)
        except (ValueError, TypeError):
            return
        health.learned(key, asyncio.get_running_loop().time(), seconds)

    # The bus hands this instance its own messages too: learning them again is harmless (same until).
    unsubscribe = bus.subscribe(learn)
    health.announce = announce
    try:
        yield
    finally:
        health.announce = None
        unsubscribe()
        for task in list(pending):
            task.cancel()


# ------------------------------------------------------------------ metrics


@hookimpl
def nexgate_metrics(app: web.Application) -> Iterator[Any]:
    proxy = app[PROXY]
    breaker = GaugeMetricFamily(
        "nexgate_target_breaker_state",
        "Circuit breaker of each target that failed lately: 0 closed, 1 half-open, 2 open (skipped).",
        labels=("provider", "upstream_model"))
    health = proxy.health
    if isinstance(health, Cooldowns):
        for (provider, model), state in health.states(asyncio.get_running_loop().time()):
            breaker.add_metric((provider, model), state)
    retries = CounterMetricFamily("nexgate_upstream_retries", "Calls of the same target again after a "
                                  "retriable failure.", labels=("provider", "upstream_model"))
    for (provider, model), count in list(proxy.stats.retries.items()):
        retries.add_metric((provider, model), count)
    fallbacks = CounterMetricFamily("nexgate_fallbacks", "Requests served by a target other than the first "
                                    "in their order, by the model alias that served.", labels=("model",))
    for alias, count in list(proxy.stats.fallbacks.items()):
        fallbacks.add_metric((alias,), count)
    yield breaker
    yield retries
    yield fallbacks
