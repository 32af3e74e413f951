"""Routing: model alias -> ordered upstream targets, from the YAML routing table.

Targets of a model are tried in a weighted random order (spreading load by
weight), then the targets of each model its fallbacks reach, transitively and
breadth-first (``ModelRoute.chain``: its own fallbacks in order, then theirs),
each target (provider + upstream model) at most once. Only targets whose
provider serves the operation are kept (``Provider.supports``: in its own dialect,
or through a translation, Chat Completions <-> Anthropic Messages), so a fallback
may cross dialects.
"""

from __future__ import annotations

import random

from nexgate_proxy import GatewayError, RequestContext, hookimpl
from nexgate_proxy.appkeys import CONFIG, PROVIDERS
from nexgate_proxy.config import Target


def weighted_order(targets: tuple[Target, ...], rand: random.Random | None = None) -> list[Target]:
    """A random permutation in which a target comes first with probability weight / total."""
    if len(targets) == 1:
        return [targets[0]]
    r = rand or random
    # Efraimidis-Spirakis: sort by u^(1/w); the order of picks is a weighted sample without replacement.
    return sorted(targets, key=lambda t: r.random() ** (1.0 / t.weight), reverse=True)


@hookimpl(trylast=True)
def nexgate_route(ctx: RequestContext) -> list[Target] | None:
    config = ctx.app[CONFIG]
    route = config.models.get(ctx.model or "")
    if route is None:
        raise GatewayError(404, f"The model `{ctx.model}` does not exist or you do not have access to it.",
                           code="model_not_found", param="model")
    providers = ctx.app[PROVIDERS]
    endpoint_format = ctx.api_format
    ordered: list[Target] = []
    seen: set[tuple[str, str]] = set()
    for alias in route.chain:
        for target in weighted_order(config.models[alias].targets):
            key = (target.provider, target.model)
            if key not in seen and providers[target.provider].supports(ctx.endpoint, endpoint_format):
                seen.add(key)
                ordered.append(target)
    if not ordered:
        raise GatewayError(400, f"The model `{ctx.model}` cannot serve {ctx.request.path}.",
                           code="unsupported_endpoint", param="model")
    ctx.route = route
    return ordered
