"""Every hook NexGate calls, with when it runs and what it may return.

Plugins implement these with ``from nexgate_proxy import hookimpl``. Hooks take
keyword arguments; an implementation may accept any subset of them.

Request phases run in this order for each proxied request::

    authenticate -> (body parsed) -> admit -> route -> reserve -> upstream
    -> settle -> guard_record -> record

Any hook of the request phases (``authenticate``, ``admit``, ``route``,
``reserve``) may stop the request by raising
:class:`nexgate_proxy.GatewayError`; the client then gets that status and an
OpenAI-shaped error. Any other exception there is a plugin's bug: the client
gets a 500 ``plugin_error`` naming the plugin, the log the traceback.
``settle``, ``guard_record`` and ``record`` always run, also after a
rejection, an upstream failure or a client disconnect; an exception in one of
their implementations is logged, counted (``nexgate_plugin_failures_total``)
and does not stop the others.

Implementations may be ``async def`` or plain functions; NexGate awaits
whatever is awaitable. ``hookwrapper``/``wrapper`` implementations are not
supported on request phases (they cannot wrap coroutines); use ``tryfirst`` /
``trylast`` to order them instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable

import pluggy

if TYPE_CHECKING:
    import argparse

    from aiohttp import web
    from prometheus_client.metrics_core import Metric

    from .config import Config, ConfigSection, Target
    from .context import Identity, RequestContext
    from .records import UsageRecord
    from .providers.base import Provider

hookspec = pluggy.HookspecMarker("nexgate")

HOOKS_VERSION = "1.0"
"""The version of these specs, MAJOR.MINOR (docs/plugins.md, "Compatibility").

MINOR grows when something is added that existing plugins can ignore: a hook, an
argument passed to a hook, a ``RequestContext`` field. MAJOR grows when a plugin
may break: a hook or argument removed or renamed, a phase moved, a return value
read differently. A plugin may set ``NEXGATE_HOOKS = "1.0"`` (what it was written
against); it then loads on 1.0 and every later 1.x, and fails at startup elsewhere.
"""


# ---------------------------------------------------------------- lifecycle


@hookspec
def nexgate_register_providers() -> dict[str, type[Provider]]:
    """Return provider classes by their config ``type`` name.

    Runs once at startup, before the routing table is resolved. Built-in types
    (``openai``, ``anthropic``, ``echo``) are registered the same way. A type
    registered twice is a startup error.
    """


@hookspec
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    """Declare the top-level config sections this plugin owns.

    Return ``nexgate_proxy.config.ConfigSection(name, parse, keys, description)``
    objects. The core parses each section once while the application is built
    and in ``nexgate config check``: it checks the section's keys, calls
    ``parse(reader, section, config)`` and reports the problems it records with
    those of the core and of every other section, in one pass. Top-level keys
    no section declares are errors. Read the typed result with
    ``config.section(SECTION)``. The sections of a built-in named by
    ``plugins.disable`` are still parsed and checked (their settings go unused).
    """


@hookspec
def nexgate_cli_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add subcommands to the ``nexgate`` command line.

    ``subparsers`` is the ``nexgate`` parser's argparse subparsers: add a parser
    per command and set its ``func`` (``args -> exit code``). Commands that work on
    the store build on ``nexgate_proxy.clikit`` (``add_command``, ``option_parents``,
    ``emit``): the same options, output and one-line errors as the built-in ones.
    Runs when the command line is built, before any command runs.
    """


@hookspec
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    """Add HTTP routes to the gateway (admin APIs, webhooks, metrics).

    Runs once while the application is built, before it starts serving. Use
    ``app.router.add_get(...)`` and friends; paths under ``/v1/`` belong to the
    proxy and must not be taken.
    """


@hookspec
async def nexgate_startup(app: web.Application, config: Config) -> None:
    """The start half of a plugin's lifecycle; prefer ``nexgate_lifespan``, which pairs both halves.

    A plugin's ``nexgate_startup`` and ``nexgate_shutdown`` run as one unit of
    ``nexgate_lifespan``: startup in its place among the units, shutdown only
    if that startup succeeded.
    """


@hookspec
async def nexgate_shutdown(app: web.Application) -> None:
    """The stop half of a plugin's lifecycle; prefer ``nexgate_lifespan``.

    Runs only after this plugin's ``nexgate_startup`` succeeded (or when it has none).
    """


@hookspec
async def nexgate_lifespan(app: web.Application, config: Config) -> AsyncIterator[None]:
    """Open and close a plugin's resources as one unit: an async generator function.

    Code before its single ``yield`` runs once per worker process before the
    first request (open connections, start background tasks); code after it
    runs when the server stops, after in-flight requests finished or the grace
    period ran out (flush, close, stop tasks). Units start in registration
    order (built-ins first, in ``DEFAULT_PLUGINS`` order, then third-party
    plugins) and stop in reverse; ``tryfirst``/``trylast`` do not change that.

    An exception before the ``yield`` stops the server from starting: every
    unit already started is stopped (its code after ``yield`` runs), tasks the
    failed one left are cancelled, and the server exits with a one-line
    message naming the plugin. Code after the ``yield`` runs only if the code
    before it finished.
    """
    yield


@hookspec
async def nexgate_ready(app: web.Application) -> tuple[str, bool] | None:
    """Report whether a dependency is reachable, for ``GET /readyz``.

    Return ``(component_name, ok)``, or None to say nothing. Must answer
    within a second; the gateway is ready when every answer is ok.
    """


@hookspec
def nexgate_metrics(app: web.Application) -> Iterable[Metric] | None:
    """Return prometheus_client metric families to export at ``GET /metrics``.

    Called by the metrics plugin each time ``/metrics`` is scraped (a plain
    function, not async: compute families from counters kept in memory, e.g.
    ``CounterMetricFamily("my_plugin_things", "...", value=state.things)``).
    A generator works. An implementation that raises loses its families for
    that scrape only, with an error logged. Without the metrics plugin it is
    never called.
    """


# ---------------------------------------------------------- request phases


@hookspec(firstresult=True)
async def nexgate_authenticate(ctx: RequestContext) -> Identity | None:
    """Establish who calls, from the request headers.

    Runs first, before the body is read (``ctx.body`` is None). Return an
    :class:`Identity` to accept the caller (the first one returned wins), None
    to leave the decision to later implementations, or raise ``GatewayError``
    (401) to reject. When no implementation returns an identity the request
    goes on anonymous (``ctx.identity`` is None): an auth plugin that requires
    keys must raise.
    """


@hookspec
async def nexgate_admit(ctx: RequestContext) -> None:
    """Decide whether the caller may make this request now (limits, bans, allowlists).

    Runs after the body is parsed: ``ctx.model``, ``ctx.stream`` and
    ``ctx.body`` are set. Raise ``GatewayError`` (403, 429) to refuse. Every
    implementation runs unless one raises.
    """


@hookspec(firstresult=True)
async def nexgate_route(ctx: RequestContext) -> list[Target] | None:
    """Choose the ordered upstream targets for ``ctx.model``.

    Return the targets to try in order (first one returned wins); the core
    tries the next on a connection failure, timeout, 429 or 5xx before any
    byte reached the client. Set ``ctx.route`` to the matched route. Raise
    ``GatewayError`` (404) for an unknown model.
    """


@hookspec
async def nexgate_reserve(ctx: RequestContext) -> None:
    """Hold what the request may cost before it goes upstream.

    Runs after ``route`` (the price depends on the model). Set
    ``ctx.estimated_cost_pico`` (integer pico-USD) and raise ``GatewayError`` (402) when the balance
    cannot cover it. Whatever is held here must be released in ``settle``.
    """


@hookspec
async def nexgate_settle(ctx: RequestContext) -> None:
    """Turn holds into the actual charge, or release them.

    Always runs, once, when the request is over: after success, rejection,
    upstream failure or client disconnect (``ctx.status``, ``ctx.usage``,
    ``ctx.client_disconnected`` tell which). For an answer the client
    receives it runs before the answer's last byte goes out. Set
    ``ctx.actual_cost_pico`` (integer pico-USD). Must not raise for expected failures.
    """


@hookspec
def nexgate_guard_record(record: UsageRecord, app: web.Application) -> None:
    """Check a usage record before any sink sees it; raise ``RecordRejected`` to drop it.

    Always runs after ``settle``. The redaction guard lives here: a record that
    could carry content never reaches ``nexgate_record``.
    """


@hookspec
async def nexgate_record(record: UsageRecord, app: web.Application) -> None:
    """Receive the metadata of a finished request (metrics, usage log, billing sinks).

    Always runs last, with a record that passed every ``guard_record``
    implementation. The record (``nexgate_proxy.records.UsageRecord``, an
    immutable named tuple shaped like a stored usage row) holds metadata only,
    never content; ``app``
    gives access to the plugin's per-app state. Keep it fast: write to a
    buffer and flush in the background.
    """


# ------------------------------------------------------- upstream attempts


@hookspec
def nexgate_upstream_attempt(ctx: RequestContext, target: Target, headers: dict[str, str]) -> None:
    """An attempt is about to be sent to ``target`` (once per attempt: a fallback makes more).

    ``headers`` are the headers this attempt will carry: a plugin may add trace
    context (``traceparent``), never content. A plain function, not async: it
    runs on the request path; keep it to a few attribute reads.
    """


@hookspec
def nexgate_upstream_done(ctx: RequestContext, target: Target, status: int, error_code: str | None) -> None:
    """The attempt at ``target`` ended: its answer is being relayed, or it failed.

    ``status`` is the upstream's HTTP status (0 when none came: timeout, connection
    failure); ``error_code`` is the failure's code (``upstream_timeout``,
    ``upstream_error``, ...), None for the attempt whose answer is relayed. The
    attempt took ``time.perf_counter() - ctx.attempt_started`` seconds (to the
    first bytes of a stream, to the whole body otherwise). A plain function, not async.
    """
