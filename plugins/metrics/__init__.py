"""Prometheus metrics at ``GET /metrics``: "is the gateway the problem?" at a glance.

Per request (families.py): requests by endpoint / model alias / provider /
status, request duration, time waiting on upstreams, the gateway's own
overhead (the difference) and time to first token as histograms, tokens and
cost by model and provider, rejections by reason; per upstream attempt
(``nexgate_upstream_done``): attempts and errors by target; live: requests in
flight, open streams; probed every ``metrics.probe_interval`` seconds: the
store's and the shared state's round trip and whether they answer.

Counters come from usage records that passed the redaction guard; times come
from the request context at settle (they carry no label a record would not).
Every plugin (this one included, third-party ones alike) exports its families
through the ``nexgate_metrics`` hook, which a scrape calls. With ``--workers N``
a scrape of any worker shows the sum over all of them (workers.py).

Access (``metrics`` section): a separate listener (``listen``), a bearer token
(``token``) and an IP allowlist (``allow_ips``), on top of the gateway's own IP
lists and bans.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nexgate_proxy import RequestContext, UsageRecord, hookimpl, logscrub
from nexgate_proxy.abuse import request_ip
from nexgate_proxy.appkeys import ABUSE, CHAIN, REDIS, STORE
from nexgate_proxy.background import stop_tasks
from nexgate_proxy.config import Config, ConfigReader, ConfigSection, Target

from .families import GatewayMetrics
from .workers import SharedMetrics, shared_directory

log = logging.getLogger("nexgate.metrics")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    listen: str = ""
    """"host:port" of a listener of its own for /metrics (then the gateway's port has none); "" = the gateway's."""
    token: str = ""
    """When set, a scrape must send ``Authorization: Bearer <token>``."""
    allow_ips: tuple[IPNetwork, ...] = ()
    """When set, only these addresses (CIDRs) may scrape."""
    multiprocess_dir: str = ""
    """Where workers share their counts; "" = the one ``--workers N`` makes ($NEXGATE_MULTIPROC_DIR)."""
    share_interval: float = 1.0
    probe_interval: float = 15.0

    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


def _listen_problem(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if value and (not sep or not port.isdigit() or not 0 < int(port) < 65536):
        return "must be host:port, e.g. 127.0.0.1:9464"
    return None


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be more than 0 seconds"


def parse_metrics_settings(r: ConfigReader, s: dict[str, Any], config: Config) -> MetricsSettings:
    p = "metrics"
    d = MetricsSettings()
    networks: list[IPNetwork] = []
    raw = s.get("allow_ips") or []
    if not isinstance(raw, list):
        r.problem(f"{p}.allow_ips", "expected a list of addresses or CIDRs")
        raw = []
    for i, item in enumerate(raw):
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            r.problem(f"{p}.allow_ips[{i}]", f"not an IP address or CIDR: {item!r}")
    return MetricsSettings(
        listen=r.value(s, "listen", p, str, d.listen, _listen_problem),
        token=r.value(s, "token", p, str, d.token),
        allow_ips=tuple(networks),
        multiprocess_dir=r.value(s, "multiprocess_dir", p, str, d.multiprocess_dir),
        share_interval=r.value(s, "share_interval", p, float, d.share_interval, _positive),
        probe_interval=r.value(s, "probe_interval", p, float, d.probe_interval, _positive),
    )


METRICS_SECTION = ConfigSection(
    "metrics", parse_metrics_settings,
    ("listen", "token", "allow_ips", "multiprocess_dir", "share_interval", "probe_interval"),
    "Who may scrape /metrics and where, how workers share their counts, how often dependencies are probed.")


class MetricsState:
    def __init__(self, settings: MetricsSettings) -> None:
        self.settings = settings
        self.counts = GatewayMetrics()
        self.shared: SharedMetrics | None = None


METRICS: web.AppKey[MetricsState] = web.AppKey("nexgate_plugins.metrics", MetricsState)


class _Scrape:
    """What ``generate_latest`` reads (it only calls ``collect``)."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> list[Any]:
        return self._families


def scrape(app: web.Application) -> bytes:
    """The exposition text: every plugin's families, summed over the workers when there are several."""
    families = app[CHAIN].metrics(app)
    shared = app[METRICS].shared
    if shared is not None:
        families = shared.merged(families)
    return generate_latest(_Scrape(families))  # type: ignore[arg-type]


# ------------------------------------------------------------------- hooks


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [METRICS_SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    settings = config.section(METRICS_SECTION)
    app[METRICS] = MetricsState(settings)
    if settings.token:
        logscrub.install([settings.token])
    if settings.address() is None:
        app.router.add_get("/metrics", _metrics_handler(app))


@hookimpl
async def nexgate_lifespan(app: web.Application, config: Config) -> AsyncIterator[None]:
    state = app[METRICS]
    settings = state.settings
    directory = shared_directory(settings.multiprocess_dir)
    tasks = [asyncio.create_task(_probe_forever(app), name="nexgate-metrics-probe")]
    if directory is not None:
        state.shared = SharedMetrics(directory)
        tasks.append(asyncio.create_task(_share_forever(app), name="nexgate-metrics-share"))
    runner = None
    address = settings.address()
    if address is not None:
        own = web.Application()
        own.router.add_get("/metrics", _metrics_handler(app))
        runner = web.AppRunner(own, access_log=None)
        await runner.setup()
        # Workers share the port like the gateway's (each answers with everyone's sum).
        await web.TCPSite(runner, address[0], address[1], reuse_port=directory is not None or None).start()
    yield
    await stop_tasks(*tasks)
    if runner is not None:
        await runner.cleanup()
    if state.shared is not None:
        state.shared.write(app[CHAIN].metrics(app))  # the last counts: they keep adding up after this exit


@hookimpl
def nexgate_metrics(app: web.Application) -> Iterator[Any]:
    return app[METRICS].counts.families()


@hookimpl(tryfirst=True)
def nexgate_authenticate(ctx: RequestContext) -> None:
    ctx.app[METRICS].counts.started()  # the first phase: the request is in flight from here


@hookimpl(trylast=True)
def nexgate_settle(ctx: RequestContext) -> None:
    ctx.app[METRICS].counts.settled(ctx)


@hookimpl
def nexgate_upstream_done(ctx: RequestContext, target: Target, status: int, error_code: str | None) -> None:
    ctx.app[METRICS].counts.attempt_done(ctx, target, status, error_code)


@hookimpl
def nexgate_record(record: UsageRecord, app: web.Application) -> None:
    app[METRICS].counts.observe(record)


# ------------------------------------------------------------------ access


def _metrics_handler(app: web.Application) -> Any:
    settings = app[METRICS].settings
    expected = f"Bearer {settings.token}".encode() if settings.token else None

    async def handler(request: web.Request) -> web.Response:
        guard = app.get(ABUSE)
        ip = request_ip(request) if request.app is app else (request.remote or "")
        refusal = guard.check(ip) if guard is not None else None
        if refusal is not None:  # the gateway's IP lists and bans hold here too
            return refusal.response()
        if settings.allow_ips and not _allowed(ip, settings.allow_ips):
            return web.json_response({"error": {"message": "Not allowed to read metrics from this address.",
                                                "type": "permission_error", "param": None,
                                                "code": "ip_not_allowed"}}, status=403)
        if expected is not None and not hmac.compare_digest(
                request.headers.get("Authorization", "").encode(), expected):
            return web.json_response({"error": {"message": "Send the metrics token as 'Authorization: Bearer "
                                                "<token>'.", "type": "authentication_error", "param": None,
                                                "code": "invalid_metrics_token"}},
                                     status=401, headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
        return web.Response(body=scrape(app), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler


def _allowed(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


# -------------------------------------------------------------- background


async def _share_forever(app: web.Application) -> None:
    state = app[METRICS]
    assert state.shared is not None
    while True:
        await asyncio.sleep(state.settings.share_interval)
        try:
            state.shared.write(app[CHAIN].metrics(app))
        except OSError as exc:
            log.warning("cannot write this worker's metrics for the others: %s", exc)


async def _probe_forever(app: web.Application) -> None:
    """Round trips to the store and the shared state: their latency, and whether they answer."""
    counts = app[METRICS].counts
    while True:
        # Not at once: the first probe waits until the gateway has settled in (and a start that fails is over).
        await asyncio.sleep(app[METRICS].settings.probe_interval)
        started = time.perf_counter()
        try:
            await asyncio.wait_for(app[STORE].ping(), 1.0)
            ok = True
        except Exception:
            ok = False
        counts.probed("store", ok, time.perf_counter() - started)
        redis = app.get(REDIS)
        if redis is not None:
            started = time.perf_counter()
            try:
                await redis.command("PING", timeout=1.0, label="metrics probe")
                ok = True
            except Exception:
                ok = False
            counts.probed("state", ok, time.perf_counter() - started)
