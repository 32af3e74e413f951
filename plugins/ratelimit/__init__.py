"""Rate limits, IP controls and brute-force bans that hold across instances.

Phases:

* ``authenticate`` (tryfirst, before any key lookup): global IP deny/allow
  lists, IP bans, and IPs whose request rate is used up. All local: no I/O.
* ``admit``: per-key IP lists, then one all-or-nothing call to the hot state
  (one Redis round trip) that checks and takes the IP's, key's and org's
  requests per minute, the key's and org's tokens per minute (reserved from an
  estimate) and concurrency slots. Sets the ``x-ratelimit-*`` headers.
* ``settle``: corrects the token reservation to real usage and frees the
  concurrency slots (only when TPM or concurrency applied). Nobody waits for
  it: in Redis the releases of every request settled in one loop iteration
  travel in one call, which later calls queue behind.
  A request that never reached ``admit`` (failed authentication, bad body) is
  counted against its IP there, and a 401 counts as a failed authentication
  per IP and per public key id; past the threshold the IP is banned on every
  instance (announced on the invalidation bus, and in the hot state), and a
  key id past its budget is locked: unknown secrets for it cost no bcrypt.

Brute-force bans are on by default (``brute_force: false`` turns them off). The
same checks guard every other authenticated surface through the abuse guard this
plugin publishes at ``app[ABUSE]`` (``nexgate_proxy.abuse.AbuseGuard``): the
admin API, ``/metrics`` and ``/v1/models`` check IPs and count failures there.

Limits come from the ``limits:`` section, overridden per key by the key row's
``limits`` JSON (``rpm``, ``tpm``, ``concurrent``, ``allow``, ``deny``) and per
organization by ``limits.orgs.<org_id>``. With nothing configured no hot-state
call is made at all. The checks of an identity are compiled once (``_Plan``),
and with in-process state admit and settle run without a coroutine.

Redis failure: ``redis_failure: open`` (default) limits in-process with a
warning and a counter; ``closed`` refuses with 503. Calls have a tight timeout
and a circuit breaker, so a dead Redis costs nothing per request.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Iterator

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nexgate_proxy import RequestContext, hookimpl
from nexgate_proxy.appkeys import ABUSE, BUS, REDIS
from nexgate_proxy.config import Config, ConfigSection

from .limiter import ADMISSION, RateLimiter
from .settings import LIMITS_SECTION


# -------------------------------------------------------------------- hooks

LIMITER: web.AppKey[RateLimiter] = web.AppKey("nexgate_plugins.ratelimit", RateLimiter)


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [LIMITS_SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    limiter = RateLimiter(config.section(LIMITS_SECTION), config.state_url,
                          {alias: route.max_output_tokens for alias, route in config.models.items()})
    app[LIMITER] = limiter
    app[ABUSE] = limiter  # the guard the admin API, /metrics, /v1/models and the auth plugin share


@hookimpl
async def nexgate_lifespan(app: web.Application) -> AsyncIterator[None]:
    limiter = app[LIMITER]
    await limiter.start(app.get(BUS), app.get(REDIS))
    yield
    await limiter.stop()


@hookimpl
async def nexgate_ready(app: web.Application) -> tuple[str, bool] | None:
    limiter = app[LIMITER]
    redis = limiter.redis
    if redis is None or not limiter.fail_closed or not limiter.has_defaults:
        return None
    return ("ratelimit", not redis.breaker.open)


@hookimpl(tryfirst=True)
def nexgate_authenticate(ctx: RequestContext) -> None:
    limiter = ctx.app[LIMITER]
    if limiter.pre_auth:
        limiter.before_auth(ctx)
    return None


# admit and settle are plain functions that return an awaitable only when there is one to wait for
# (the chain awaits it): with in-process state a request costs no coroutine here.


@hookimpl
def nexgate_admit(ctx: RequestContext) -> Awaitable[None] | None:
    limiter = ctx.app[LIMITER]
    identity = ctx.identity
    if limiter.has_defaults or (identity is not None and (identity.limits or identity.org_limits)):
        return limiter.admit_now(ctx)
    return None


@hookimpl
def nexgate_settle(ctx: RequestContext) -> Awaitable[None] | None:
    limiter = ctx.app[LIMITER]
    if limiter.note_needed or ADMISSION in ctx.stash:
        return limiter.settle_now(ctx)
    return None


# ------------------------------------------------------------------ metrics


@hookimpl
def nexgate_metrics(app: web.Application) -> Iterator[Any]:
    """Counters read only when /metrics is scraped."""
    limiter = app[LIMITER]
    refused = CounterMetricFamily("nexgate_ratelimit_refused", "Requests refused by NexGate's limits.",
                                  labels=("code",))
    for code, n in sorted(limiter.refused.items()):
        refused.add_metric((code,), n)
    yield refused
    yield CounterMetricFamily("nexgate_ratelimit_fallback",
                              "Limit checks done in-process because the shared state was unavailable.",
                              value=limiter.fallback_decisions)
    yield CounterMetricFamily("nexgate_ratelimit_unavailable",
                              "Requests refused with 503 because the shared state was unavailable.",
                              value=limiter.unavailable)
    redis = limiter.redis
    yield CounterMetricFamily("nexgate_ratelimit_state_failures",
                              "Failed or timed-out calls to the shared rate limit state.",
                              value=redis.failures if redis else 0)
    yield CounterMetricFamily("nexgate_ratelimit_leased_admits",
                              "Requests admitted from window leases this instance holds, without a Redis call.",
                              value=redis.local_admits if redis else 0)
    yield GaugeMetricFamily("nexgate_ratelimit_circuit_open",
                            "1 while calls to the shared rate limit state are skipped.",
                            value=1 if redis and redis.breaker.open else 0)

