"""Prepaid credits: hold the worst case before a request, charge the actual cost after it.

reserve: estimate the most the request can cost (prompt estimated from the body,
output capped by the client's max_tokens or the configured default: the worst
case of the dearest of its targets, each token at its priciest class there, as
a prompt may be written to the cache whole) and hold it atomically against balance minus open
holds, shared by every instance through the hot state. Not enough -> 402.

settle: the cost from the upstream's usage (or, for a stream cut short, from the
input plus what was relayed, marked estimated); release the hold; take the
cost off the cached balance. The ledger debit is booked with the usage row
(see usage_log): one row, one debit, once.

credits from elsewhere (``nexgate credits grant``, a payment webhook on another
instance): in process, the store's change feed brings each one with its feed
position, and the cached balance takes it exactly once (not when the balance was
read after it). On Redis, whoever booked it raised the shared balance there.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from decimal import Decimal

from typing import Any, AsyncIterator, Iterator

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily

from nexgate_proxy import GatewayError, RequestContext, StashKey, Usage, hookimpl
from nexgate_proxy.appkeys import FEED, REDIS, STORE
from nexgate_proxy.config import Config, ConfigReader, ConfigSection
from .holds import (
    CreditState,
    CreditStateUnavailable,
    StoreBalance,
    open_credit_state,
)
from nexgate_proxy.money import cost_pico, format_usd, price_problems, usd_to_pico, worst_cost_pico
from nexgate_proxy.store import CREDIT_CHANGE, MISSED, Store, StoreChange, StoreError

log = logging.getLogger("nexgate.credits")
COST_HEADER = "x-nexgate-cost-usd"


@dataclass(frozen=True, slots=True)
class CreditSettings:
    enabled: bool = True
    overdraft_usd: Decimal = Decimal(0)
    default_max_output_tokens: int = 4096
    hold_grace_seconds: float = 60.0
    """A hold outlives the request's total timeout by this much, then frees itself."""


def parse_credit_settings(r: ConfigReader, s: dict[str, Any], config: Config) -> CreditSettings:
    p = "credits"
    d = CreditSettings()
    settings = CreditSettings(
        enabled=r.value(s, "enabled", p, bool, d.enabled),
        overdraft_usd=r.value(s, "overdraft_usd", p, Decimal, d.overdraft_usd,
                              lambda v: None if v >= 0 else "must not be negative"),
        default_max_output_tokens=r.value(s, "default_max_output_tokens", p, int, d.default_max_output_tokens,
                                          lambda v: None if v > 0 else "must be greater than 0"),
        hold_grace_seconds=r.value(s, "hold_grace_seconds", p, float, d.hold_grace_seconds,
                                   lambda v: None if v >= 0 else "must not be negative"),
    )
    if settings.enabled:
        for alias, route in config.models.items():
            if route.price is None and any(t.price is None for t in route.targets):
                r.problem(f"models.{alias}.price", "required while credits are enabled "
                          "(USD per 1M tokens, e.g. {input: 0.15, output: 0.60}), or set free: true")
            for i, target in enumerate(route.targets):
                for problem in price_problems(target.price) if target.price else ():
                    r.problems.append(f"models.{alias}.route[{i}].price.{problem}")
    return settings


CREDITS_SECTION = ConfigSection("credits", parse_credit_settings, (
    "enabled", "overdraft_usd", "default_max_output_tokens", "hold_grace_seconds"),
    "Prepaid credits: hold the worst case before a request, charge the actual cost after it.")


class Credits:
    def __init__(self, settings: CreditSettings) -> None:
        self.settings = settings
        self.overdraft_pico = usd_to_pico(settings.overdraft_usd)
        self.holds_open = 0
        """Requests holding credit now (this process): a metric."""
        self.state: CreditState | None = None
        self._loading: dict[str, asyncio.Future[StoreBalance]] = {}

    async def load_balance(self, store: Store, account_id: str) -> StoreBalance:
        """The durable balance and its feed position; concurrent first requests of an account share one query."""
        pending = self._loading.get(account_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[StoreBalance] = asyncio.get_running_loop().create_future()
        self._loading[account_id] = future
        try:
            balance = StoreBalance(*await store.balance_snapshot(account_id))
            future.set_result(balance)
            return balance
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else StoreError("cancelled"))
            future.exception()  # retrieved here; waiters re-raise it
            raise
        finally:
            del self._loading[account_id]

    def on_store_change(self, change: StoreChange) -> None:
        if self.state is None:
            return
        if change.kind == CREDIT_CHANGE and change.amount_pico:
            self.state.credit_from_store(change.subject, change.amount_pico, change.id)
        elif change.kind == MISSED.kind:
            self.state.reload_balances()


CREDITS: web.AppKey[Credits] = web.AppKey("nexgate_plugins.credits", Credits)


@dataclass(slots=True)
class _Hold:
    account_id: str
    held_pico: int
    prompt_estimate: int


HOLD: StashKey[_Hold] = StashKey("credits.hold")
"""What reserve held for a request, for settle."""


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [CREDITS_SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    app[CREDITS] = Credits(config.section(CREDITS_SECTION))


@hookimpl
async def nexgate_lifespan(app: web.Application, config: Config) -> AsyncIterator[None]:
    credits = app[CREDITS]
    if credits.settings.enabled:
        credits.state = open_credit_state(config.state_url, redis=app.get(REDIS))
        unsubscribe = app[FEED].subscribe(credits.on_store_change)
    yield
    if credits.state is not None:
        unsubscribe()
        await credits.state.close()


@hookimpl
async def nexgate_reserve(ctx: RequestContext) -> None:
    credits = ctx.app[CREDITS]
    identity = ctx.identity
    if credits.state is None or identity is None or ctx.body is None:
        return
    prices = [t.price for t in ctx.targets if t.price is not None]
    if not prices:
        return
    prompt = ctx.prompt_estimate()
    output = 0
    if ctx.endpoint != "embeddings":
        route_cap = ctx.route.max_output_tokens if ctx.route else None
        output = ctx.output_cap() or route_cap or credits.settings.default_max_output_tokens
    # The request may end on any of its targets, each token in its priciest class there.
    worst = (worst_cost_pico(prices[0], prompt, output) if len(prices) == 1
             else max(worst_cost_pico(price, prompt, output) for price in prices))
    ctx.estimated_cost_pico = worst
    if worst == 0:
        return
    account = identity.account_id
    store = ctx.app[STORE]
    hold_seconds = (ctx.route.timeouts.total if ctx.route else 900) + credits.settings.hold_grace_seconds
    try:
        reservation = await credits.state.reserve(account, ctx.request_id, worst, credits.overdraft_pico,
                                                  hold_seconds, lambda: credits.load_balance(store, account))
    except (CreditStateUnavailable, StoreError):
        log.error("cannot check the balance of %s: credit state or store unavailable", account)
        raise GatewayError(503, "The gateway cannot check your balance right now; retry shortly.",
                           code="credits_unavailable") from None
    if not reservation.ok:
        raise GatewayError(
            402, f"Insufficient credits: this request may cost up to ${format_usd(worst)} and your available "
                 f"balance is {signed_usd(reservation.available_pico)}. Add credits, or lower max_tokens.",
            code="insufficient_credits")
    ctx.stash[HOLD] = _Hold(account, worst, prompt)
    credits.holds_open += 1


def signed_usd(pico: int) -> str:
    """"$0.000000000075", "-$1.5": exact, for a person."""
    return f"-${format_usd(-pico)}" if pico < 0 else f"${format_usd(pico)}"


def _billable_usage(ctx: RequestContext, hold: _Hold | None) -> Usage:
    """The tokens to charge; none when the upstream did no work."""
    usage = ctx.usage
    if usage.reported:
        return usage
    served = ctx.status and ctx.status < 400 or ctx.client_disconnected
    if not served and not usage.stream_events:
        return Usage()  # refused before or by the upstream: no work, no charge
    # A stream cut short, or an upstream that did not report: input as estimated, output as relayed
    # (stream events, or the proxy's estimate from a non-streamed answer's text).
    prompt = hold.prompt_estimate if hold else (ctx.prompt_estimate() if ctx.body else 0)
    return Usage(prompt_tokens=prompt, completion_tokens=max(usage.completion_tokens, usage.stream_events))


@hookimpl
def nexgate_settle(ctx: RequestContext) -> None:
    credits = ctx.app[CREDITS]
    hold = ctx.stash.get(HOLD)
    if hold is not None:
        credits.holds_open -= 1
    if credits.state is None or ctx.identity is None:
        return
    target = ctx.target
    price = target.price if target is not None else None
    cost = 0
    if price is not None and target is not None:
        billable = _billable_usage(ctx, hold)
        cost = cost_pico(price, billable)
        if not ctx.usage.reported:
            # The usage record shows what was charged; usage_reported=False marks it estimated.
            ctx.usage.prompt_tokens, ctx.usage.completion_tokens = billable.prompt_tokens, billable.completion_tokens
    if price is not None or hold is not None:
        ctx.actual_cost_pico = cost
        ctx.response_headers[COST_HEADER] = format_usd(cost)
    if hold is None and cost == 0:
        return
    # In process: on Redis, the hold came from this instance's lease (see credit_redis). The debit
    # itself is booked through the usage row.
    credits.state.settle(ctx.identity.account_id, ctx.request_id, cost)


@hookimpl
def nexgate_metrics(app: web.Application) -> Iterator[Any]:
    yield GaugeMetricFamily("nexgate_credit_holds_in_flight", "Requests holding credit until they settle.",
                            value=app[CREDITS].holds_open)


@hookimpl
def nexgate_cli_commands(subparsers: Any) -> None:
    from . import cli

    cli.register(subparsers)
