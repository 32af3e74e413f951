"""The redaction guard: privacy enforced at every place data leaves a request.

A request's content (prompt, completion, stream chunks, upstream error bodies)
lives in memory only. What may be kept is metadata, and this plugin checks it
at each persistence boundary, failing closed:

* **Usage records** (``nexgate_guard_record``): before any sink (the usage
  log and its outbox/spool files, the store, metrics, billing sinks) sees a
  record, every field is checked against an allowlist of types, sizes and
  charsets: ids and key prefixes match strict patterns, ``model`` is a
  configured alias or None, ``provider``/``upstream_model`` come from the
  config, ``endpoint`` is a known operation, ``error_code`` is snake_case
  (every NexGate code is), ``client_ip`` is an IP address. A record that fails
  is dropped from every sink (``RecordRejected``), counted in
  ``nexgate_redaction_dropped_total{sink="record"}`` and logged by request id
  and field name, never by value. Since the usage log writes only records that
  passed, its outbox and the store see only checked metadata.
  Spool files hold only records that passed; a replay decodes them strictly
  and the store refuses malformed values (``rejected.jsonl``).
* **Log records and error reports**: :mod:`nexgate_proxy.logscrub` is
  installed on the root handlers while the app is built and again at start:
  keys, tokens and the configured provider keys are masked, request data in
  arguments and exception messages is withheld (``sink="log"`` counts records
  the scrubber had to replace).
* **Metric labels**: the metrics plugin labels from records that passed this
  guard: endpoint (a fixed set), model (a configured alias or ``-``), status.

It also runs the **IP retention** job: client IPs in usage records are nulled
once older than ``privacy.ip_retention_days`` (default 30), at start and every
hour (idempotent: several instances need no leader). ``nexgate retention run``
does the same on demand.

The guard cannot be turned off silently: listing ``redaction`` in
``plugins.disable`` refuses to start unless ``privacy.allow_unguarded: true``
is also set (:func:`nexgate_on_disabled`, called by the plugin manager).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Callable, Iterator

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nexgate_proxy import RecordRejected, UsageRecord, hookimpl, iplog, logscrub
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.background import stop_tasks
from nexgate_proxy.clikit import Env, add_command, emit, non_negative, option_parents
from nexgate_proxy.config import Config, ConfigError, ConfigReader, ConfigSection
from nexgate_proxy.endpoints import ENDPOINTS
from nexgate_proxy.store import Store, StoreError

log = logging.getLogger("nexgate.privacy")

NAME = "redaction"
RETENTION_INTERVAL = 3600.0
"""Seconds between two runs of the IP retention job."""
RETENTION_RETRY = 300.0
"""Seconds before retrying a run that failed (the store was unreachable)."""
SINKS = ("record", "log")

# ------------------------------------------------------------------ settings


@dataclass(frozen=True, slots=True)
class PrivacySettings:
    ip_retention_days: int = 30
    """Client IPs in usage records are nulled once older than this; 0 clears them at every run (hourly)."""
    allow_unguarded: bool = False
    """Consent to run with the redaction plugin disabled (``plugins.disable: [redaction]``)."""
    org_request_rows: bool = False
    """Let organization admins list an organization's request-level usage rows (``GET /admin/v1/usage``);
    off: they see aggregates per key, model and day only (the privacy policy's promise)."""


MAX_RETENTION_DAYS = 3650


def parse_privacy_settings(r: ConfigReader, s: dict[str, Any], config: Config) -> PrivacySettings:
    p = "privacy"
    d = PrivacySettings()
    return PrivacySettings(
        ip_retention_days=r.value(
            s, "ip_retention_days", p, int, d.ip_retention_days,
            lambda v: None if 0 <= v <= MAX_RETENTION_DAYS else f"must be between 0 and {MAX_RETENTION_DAYS} days"),
        allow_unguarded=r.value(s, "allow_unguarded", p, bool, d.allow_unguarded),
        org_request_rows=r.value(s, "org_request_rows", p, bool, d.org_request_rows),
    )


PRIVACY_SECTION = ConfigSection("privacy", parse_privacy_settings,
                                ("ip_retention_days", "allow_unguarded", "org_request_rows"),
                                "How long client IPs are kept, consent to run without the privacy guard, and "
                                "what organization admins see of usage.")


def is_disabled(config: Config) -> bool:
    """True when ``plugins.disable`` names this plugin."""
    return bool({NAME, f"nexgate_plugins.{NAME}"} & set(config.plugins.disable))


def nexgate_on_disabled(config: Config) -> None:
    """Raise ConfigError if the guard is disabled without ``privacy.allow_unguarded: true``; else warn loudly.

    The plugin manager calls this when ``plugins.disable`` names ``redaction``, with the parsed
    config (the ``privacy`` section is parsed even then; see ``nexgate_proxy.plugins.ON_DISABLED``).
    """
    if not is_disabled(config):
        return
    if not config.section(PRIVACY_SECTION).allow_unguarded:
        raise ConfigError(config.source, [
            "plugins.disable: 'redaction' is the privacy guard (it keeps content out of the usage log, the "
            "store, logs and metrics, and clears old client IPs); to run without it anyway, also set "
            "privacy.allow_unguarded: true"])
    log.warning("PRIVACY GUARD DISABLED: plugins.disable names 'redaction' and privacy.allow_unguarded is true. "
                "Usage records, spool files, logs and metrics are NOT checked for content, and client IPs are "
                "NOT cleared after privacy.ip_retention_days. Do not run like this in production.")


# -------------------------------------------------------------------- rules

_REQUEST_ID = re.compile(r"req_[0-9a-f]{16,64}")
_ACCOUNT_ID = re.compile(r"[a-z][a-z0-9]{0,15}_[A-Za-z0-9]{1,64}")
"""NexGate ids (usr_..., org_..., key_...): a short kind, an underscore, letters and digits."""
_KEY_PREFIX = re.compile(r"[a-z]{2,8}_[0-9A-Za-z]{1,16}")
"""A display prefix (ngk_ + the 12-char public id): never long enough to hold a secret."""
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")
"""Model and provider names in rows read back from spool files (the config may have changed since)."""

KNOWN_ERROR_CODES = frozenset({
    "invalid_json", "missing_required_parameter", "invalid_type", "model_not_found", "unsupported_endpoint",
    "request_too_large", "internal_error", "upstream_timeout", "upstream_unreachable", "upstream_error",
    "upstream_auth_failed", "upstream_rate_limited", "upstream_response_too_large", "upstream_interrupted",
    "upstream_stream_interrupted", "client_disconnected", "missing_api_key", "invalid_api_key",
    "model_not_allowed", "insufficient_credits", "credits_unavailable", "rate_limit_requests",
    "rate_limit_tokens", "concurrency_limit", "ip_rate_limit", "ip_not_allowed", "ip_banned",
    "rate_limit_unavailable",
})
"""The codes NexGate's core and built-in plugins set; other plugins' codes must match the snake_case pattern."""

_MIN_TIMESTAMP = 946_684_800.0  # 2000-01-01
_MAX_INT = 2**63 - 1
_MAX_IP_LENGTH = 45

_MAX_TIMESTAMP_SKEW = 86_400.0

_request_id_ok = _REQUEST_ID.fullmatch
_account_id_ok = _ACCOUNT_ID.fullmatch
_key_prefix_ok = _KEY_PREFIX.fullmatch
_error_code_ok_re = _ERROR_CODE.fullmatch
_name_ok = _NAME.fullmatch

_IP_CACHE_SIZE = 4096
_valid_ips: dict[str, bool] = {}
"""Addresses already checked: parsing one costs microseconds, and clients repeat."""


def _is_int(value: Any, low: int = 0, high: int = _MAX_INT) -> bool:
    return type(value) is int and low <= value <= high


_CACHE_SIZE = 65_536
_good_ids: set[str] = set()
_good_prefixes: set[str] = set()
"""Ids and key prefixes already checked: the same accounts and keys come back on every request."""


def _remember(cache: set[str], value: str) -> bool:
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache.add(value)
    return True


def _id_ok(value: Any) -> bool:
    return value is None or value in _good_ids or (
        type(value) is str and len(value) <= 80 and _account_id_ok(value) is not None and _remember(_good_ids, value))


def _prefix_ok(value: Any) -> bool:
    return value is None or value in _good_prefixes or (
        type(value) is str and len(value) <= 25 and _key_prefix_ok(value) is not None
        and _remember(_good_prefixes, value))


def _row_name_ok(value: Any, allowed: frozenset[str]) -> bool:
    return value is None or (type(value) is str and (value in allowed or (len(value) <= 200
                                                                          and _name_ok(value) is not None)))


def _member(value: Any, allowed: frozenset[str]) -> bool:
    return value is None or (type(value) is str and value in allowed)


def valid_ip(value: Any) -> bool:
    """None, "" (no peer) or an IP address (no IPv6 zone: a zone id is free text)."""
    if value is None or value == "":
        return True
    if type(value) is not str or len(value) > _MAX_IP_LENGTH or "%" in value:
        return False
    known = _valid_ips.get(value)
    if known is not None:
        return known
    try:
        ipaddress.ip_address(value)
        ok = True
    except ValueError:
        ok = False
    if len(_valid_ips) >= _IP_CACHE_SIZE:
        _valid_ips.clear()
    _valid_ips[value] = ok
    return ok


def _pico_ok(value: Any) -> bool:
    """None (nothing priced) or a cost: never negative."""
    return value is None or (type(value) is int and 0 <= value <= _MAX_INT)


def _error_code_ok(value: Any) -> bool:
    return value is None or (type(value) is str and (value in KNOWN_ERROR_CODES or (
        len(value) <= 64 and _error_code_ok_re(value) is not None)))


def _ts_ok(value: Any) -> bool:
    """An aware UTC datetime between 2000 and a day from now."""
    return (type(value) is datetime and value.tzinfo is timezone.utc
            and _MIN_TIMESTAMP <= value.timestamp() <= time.time() + _MAX_TIMESTAMP_SKEW)


Rule = tuple[str, Callable[["Guard", Any], bool]]

# One rule per field, in field order; checked first to last, the first failure names the field.
_RECORD_RULES: tuple[Rule, ...] = (
    ("request_id", lambda g, r: type(r.request_id) is str and _request_id_ok(r.request_id) is not None),
    ("ts", lambda g, r: _ts_ok(r.ts)),
    ("endpoint", lambda g, r: type(r.endpoint) is str and r.endpoint in g.endpoints),
    ("model", lambda g, r: _member(r.model, g.models)),
    ("provider", lambda g, r: _member(r.provider, g.providers)),
    ("upstream_model", lambda g, r: _member(r.upstream_model, g.upstream_models)),
    ("account_id", lambda g, r: _id_ok(r.account_id)),
    ("org_id", lambda g, r: _id_ok(r.org_id)),
    ("key_id", lambda g, r: _id_ok(r.key_id)),
    ("key_prefix", lambda g, r: _prefix_ok(r.key_prefix)),
    ("prompt_tokens", lambda g, r: _is_int(r.prompt_tokens)),
    ("completion_tokens", lambda g, r: _is_int(r.completion_tokens)),
    ("cached_tokens", lambda g, r: _is_int(r.cached_tokens)),
    ("usage_estimated", lambda g, r: type(r.usage_estimated) is bool),
    ("estimated_cost_pico", lambda g, r: _pico_ok(r.estimated_cost_pico)),
    ("actual_cost_pico", lambda g, r: _pico_ok(r.actual_cost_pico)),
    ("latency_ms", lambda g, r: _is_int(r.latency_ms)),
    ("status", lambda g, r: _is_int(r.status, 0, 999)),
    ("error_code", lambda g, r: _error_code_ok(r.error_code)),
    ("stream", lambda g, r: type(r.stream) is bool),
    ("client_ip", lambda g, r: valid_ip(r.client_ip)),
    ("attempts", lambda g, r: _is_int(r.attempts, 0, 1000)),
)

RECORD_RULES_COMPLETE = [n for n, _ in _RECORD_RULES] == list(UsageRecord._fields)
"""False when a field was added to UsageRecord without a rule here: then nothing passes."""
_UNRULED = "the record has fields the redaction guard has no rule for"


def _first_problem(guard: Guard, item: Any, rules: tuple[Rule, ...], complete: bool) -> str | None:
    for name, ok in rules:
        if not ok(guard, item):
            return f"field '{name}' is not allowed metadata"
    return None if complete else _UNRULED


class Guard:
    """The allowlist, built from the config once; per-app counters of what it dropped."""

    def __init__(self, config: Config) -> None:
        self.models = frozenset(config.models)
        self.providers = frozenset(config.providers)
        self.upstream_models = frozenset(t.model for route in config.models.values() for t in route.targets)
        self.endpoints = frozenset(e.name for e in ENDPOINTS)
        self.dropped: Counter[str] = Counter({"record": 0})

    # -- usage records (live, before every sink)

    def record_problem(self, record: Any) -> str | None:
        """What is wrong with a record (a field name and the rule; never its value), or None."""
        if type(record) is not UsageRecord:
            return f"not a UsageRecord ({type(record).__name__})"
        if RECORD_RULES_COMPLETE and self._record_ok(record):
            return None  # the fast path, on every request: one expression, no call per field
        return _first_problem(self, record, _RECORD_RULES, RECORD_RULES_COMPLETE)

    def _record_ok(self, r: UsageRecord) -> bool:
        """The same rules as _RECORD_RULES, inlined (tests check that both agree)."""
        ip = r.client_ip
        return (
            type(r.request_id) is str and _request_id_ok(r.request_id) is not None
            and _ts_ok(r.ts)
            and r.endpoint in self.endpoints and type(r.endpoint) is str
            and (r.model is None or (type(r.model) is str and r.model in self.models))
            and (r.provider is None or (type(r.provider) is str and r.provider in self.providers))
            and (r.upstream_model is None or (type(r.upstream_model) is str
                                              and r.upstream_model in self.upstream_models))
            and _id_ok(r.account_id) and (r.org_id is None or _id_ok(r.org_id))
            and _id_ok(r.key_id) and _prefix_ok(r.key_prefix)
            and type(r.prompt_tokens) is int and 0 <= r.prompt_tokens <= _MAX_INT
            and type(r.completion_tokens) is int and 0 <= r.completion_tokens <= _MAX_INT
            and type(r.cached_tokens) is int and 0 <= r.cached_tokens <= _MAX_INT
            and type(r.usage_estimated) is bool
            and _pico_ok(r.estimated_cost_pico) and _pico_ok(r.actual_cost_pico)
            and type(r.latency_ms) is int and 0 <= r.latency_ms <= _MAX_INT
            and type(r.status) is int and 0 <= r.status <= 999
            and (r.error_code is None or _error_code_ok(r.error_code))
            and type(r.stream) is bool
            and (ip is None or ip == "" or _valid_ips.get(ip) is True or valid_ip(ip))
            and type(r.attempts) is int and 0 <= r.attempts <= 1000
        )

    def check_record(self, record: Any) -> None:
        try:
            problem = self.record_problem(record)
        except Exception as exc:  # a guard that cannot decide fails closed
            problem = f"the check failed ({type(exc).__name__})"
        if problem is not None:
            self.reject("record", _request_id(record), problem)
            raise RecordRejected(problem)

    def reject(self, sink: str, request_id: str, problem: str) -> None:
        self.dropped[sink] += 1
        log.error("redaction guard: usage record %s dropped from every sink: %s", request_id, problem)


def _request_id(item: Any) -> str:
    """The item's request id when it is one (so it may be logged), else a placeholder."""
    value = getattr(item, "request_id", None)
    if type(value) is str and _REQUEST_ID.fullmatch(value):
        return value
    return "(request id withheld)"


# ---------------------------------------------------------------- retention


async def run_retention(store: Store, days: int, now: datetime | None = None) -> int:
    """Null the client IP of usage records older than ``days``; return how many changed. Idempotent."""
    if type(days) is not int or not 0 <= days <= MAX_RETENTION_DAYS:
        raise ValueError(f"ip_retention_days must be an integer between 0 and {MAX_RETENTION_DAYS}")
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=days)
    return await store.clear_client_ips(cutoff)


@dataclass
class PrivacyState:
    settings: PrivacySettings
    guard: Guard
    task: asyncio.Task[None] | None = None
    retention_runs: int = 0
    retention_failures: int = 0
    ips_cleared: int = 0
    last_retention: float | None = None
    """Epoch seconds of the last successful run."""
    secrets: tuple[str, ...] = field(default=(), repr=False)


PRIVACY: web.AppKey[PrivacyState] = web.AppKey("nexgate_plugins.redaction", PrivacyState)


async def _retention_loop(app: web.Application) -> None:
    state = app[PRIVACY]
    while True:
        delay = RETENTION_INTERVAL
        try:
            cleared = await run_retention(app[STORE], state.settings.ip_retention_days)
        except asyncio.CancelledError:
            raise
        except StoreError as exc:
            state.retention_failures += 1
            delay = min(RETENTION_RETRY, RETENTION_INTERVAL)
            log.warning("IP retention run failed (%s); retrying in %d s", type(exc).__name__, delay)
        except Exception:
            state.retention_failures += 1
            delay = min(RETENTION_RETRY, RETENTION_INTERVAL)
            log.exception("IP retention run failed; retrying in %d s", delay)
        else:
            state.retention_runs += 1
            state.ips_cleared += cleared
            state.last_retention = time.time()
            if cleared:
                log.info("IP retention: cleared the client IP of %d usage records older than %d days", cleared,
                         state.settings.ip_retention_days)
        logscrub.install(state.secrets)  # handlers added since the last run get the filter too
        await asyncio.sleep(delay)


# -------------------------------------------------------------------- sinks


def _config_secrets(config: Config) -> tuple[str, ...]:
    found = list(config.secrets())
    for provider in config.providers.values():
        for name, value in provider.headers.items():
            if re.search(r"(?i)auth|key|token|secret", name):
                found.append(value.split(" ", 1)[-1])  # "Bearer xyz" -> "xyz"
    return tuple(found)


# -------------------------------------------------------------------- hooks


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [PRIVACY_SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    secrets = _config_secrets(config)
    app[PRIVACY] = PrivacyState(settings=config.section(PRIVACY_SECTION), guard=Guard(config), secrets=secrets)
    iplog.set_rotation(app[PRIVACY].settings.ip_retention_days)  # IP tags in logs rotate with the retention
    logscrub.install(secrets)


@hookimpl
async def nexgate_lifespan(app: web.Application) -> AsyncIterator[None]:
    state = app[PRIVACY]
    logscrub.install(state.secrets)  # handlers configured after the app was built
    state.task = asyncio.create_task(_retention_loop(app), name="nexgate-ip-retention")
    yield
    await stop_tasks(state.task)
    state.task = None


@hookimpl
def nexgate_guard_record(record: UsageRecord, app: web.Application) -> None:
    state = app.get(PRIVACY)
    if state is None:
        raise RecordRejected("the redaction guard is not set up")
    state.guard.check_record(record)


# ------------------------------------------------------------------ metrics


@hookimpl
def nexgate_metrics(app: web.Application) -> Iterator[Any]:
    """Counters read only when /metrics is scraped."""
    state = app[PRIVACY]
    dropped = CounterMetricFamily(
        "nexgate_redaction_dropped", "Records the redaction guard kept from a sink (fail closed).",
        labels=("sink",))
    dropped.add_metric(("record",), state.guard.dropped["record"])
    dropped.add_metric(("log",), logscrub.STATS["failed"])
    yield dropped
    yield CounterMetricFamily("nexgate_log_redactions", "Log records in which a secret was masked.",
                              value=logscrub.STATS["scrubbed"])
    yield CounterMetricFamily("nexgate_log_withheld", "Log records with an argument or exception "
                              "message withheld as possible request data.", value=logscrub.STATS["withheld"])
    yield CounterMetricFamily("nexgate_retention_ips_cleared", "Usage records whose client IP the "
                              "retention job cleared (this process).", value=state.ips_cleared)
    yield CounterMetricFamily("nexgate_retention_failures", "Failed IP retention runs (this process).",
                              value=state.retention_failures)
    yield GaugeMetricFamily("nexgate_retention_last_success_timestamp_seconds",
                            "When the IP retention job last succeeded (0: not yet).",
                            value=state.last_retention or 0)


# ----------------------------------------------------------------- commands


async def _retention_run(env: Env, store: Store) -> int:
    days = env.args.days
    if days is None:
        days = env.config.section(PRIVACY_SECTION).ip_retention_days if env.config else 30
    cleared = await run_retention(store, days)
    emit(env, {"ip_retention_days": days, "cleared": cleared},
         f"Cleared the client IP of {cleared} usage records older than {days} days.")
    return 0


@hookimpl
def nexgate_cli_commands(subparsers: Any) -> None:
    common, _ = option_parents("")
    retention = subparsers.add_parser("retention", help="data retention jobs")
    retention_sub = retention.add_subparsers(dest="retention_command", required=True, metavar="COMMAND")
    p = add_command(retention_sub, "run", "clear client IPs of usage records older than privacy.ip_retention_days "
                    "now (gateways also do it hourly)", _retention_run, common)
    p.add_argument("--days", type=non_negative, metavar="N",
                   help="override privacy.ip_retention_days (default: the config's, else 30)")
