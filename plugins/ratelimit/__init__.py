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
  instance (announced on the invalidation bus, and in the hot state).

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

import ipaddress
import logging
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Awaitable, Iterator, Mapping, Sequence

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nexgate_plugins.metrics import add_collector
from nexgate_proxy import GatewayError, Identity, RequestContext, hookimpl
from nexgate_proxy.appkeys import BUS
from nexgate_proxy.clientip import IPNetwork, parse_networks
from nexgate_proxy.config import Config, ConfigReader
from nexgate_proxy.state.redis import StateUnavailable

from .counters import (
    BANNED,
    CONCURRENCY,
    DEFAULT_PREFIX,
    REQUESTS,
    TOKENS,
    BruteForce,
    Check,
    Counters,
    Decision,
    MemoryCounters,
    RedisCounters,
    Release,
    open_counters,
)
from nexgate_proxy.keys import extract_key, parse_key

log = logging.getLogger("nexgate.ratelimit")

NAME = "ratelimit"
"""This plugin's key in ``ctx.scratch``."""
WINDOW_MS = 60_000
BAN_EVENT = "ratelimit.ban"
"""Bus message kind: value is ``"<ip subject> <milliseconds>"``."""
MAX_LOCAL_ENTRIES = 100_000

_QUOTA_KEYS = ("rpm", "tpm", "concurrent")
_SECTION_KEYS = ("key", "org", "orgs", "ip", "brute_force", "allow", "deny", "ipv6_prefix",
                 "default_output_tokens", "redis_failure", "redis_timeout_ms", "redis_prefix",
                 "concurrency_lease")


# ------------------------------------------------------------------ settings


@dataclass(frozen=True, slots=True)
class Quota:
    """Per minute (rpm, tpm) and at once (concurrent). 0 means no limit."""

    rpm: int = 0
    tpm: int = 0
    concurrent: int = 0

    def __bool__(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrent)


@dataclass(frozen=True, slots=True)
class LimitSettings:
    key: Quota = Quota()
    org: Quota = Quota()
    orgs: Mapping[str, Quota] = field(default_factory=dict)
    ip_rpm: int = 0
    brute_force: BruteForce | None = None
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    ipv6_prefix: int = 64
    """IPv6 clients are limited, banned and counted per network of this size (one end site holds a /64)."""
    default_output_tokens: int = 1024
    """Output tokens reserved for TPM when the request sets no max_tokens (corrected at settle)."""
    redis_failure: str = "open"
    redis_timeout_ms: int = 100
    redis_prefix: str = DEFAULT_PREFIX
    concurrency_lease: float = 60.0
    """Seconds a concurrency slot lives unless renewed; a crashed instance's slots free after this."""


def _int_at_least(low: int) -> Any:
    return lambda v: None if v >= low else f"must be an integer >= {low}"


def _quota(r: ConfigReader, raw: Any, p: str, base: Quota = Quota()) -> Quota:
    s = r.mapping(raw, p, _QUOTA_KEYS)
    return Quota(*(r.value(s, k, p, int, getattr(base, k), _int_at_least(0)) for k in _QUOTA_KEYS))


def _cidrs(r: ConfigReader, s: dict[str, Any], key: str, p: str) -> tuple[IPNetwork, ...]:
    values = r.value(s, key, p, list, [])
    out: list[IPNetwork] = []
    for i, value in enumerate(values):
        if isinstance(value, (dict, list)):
            r.problem(f"{p}.{key}[{i}]", "expected an IP address or CIDR string, e.g. 10.0.0.0/8 or 2001:db8::/32")
            continue
        try:
            out += parse_networks([value])
        except ValueError as exc:
            r.problem(f"{p}.{key}[{i}]", str(exc))
    return tuple(out)


def parse_limit_settings(config: Config, problems: list[str]) -> LimitSettings:
    r = ConfigReader(problems)
    p = "limits"
    s = r.mapping(config.raw.get("limits"), p, _SECTION_KEYS)
    d = LimitSettings()
    org = _quota(r, s.get("org"), f"{p}.org")
    orgs = {str(org_id): _quota(r, spec, f"{p}.orgs.{org_id}", org)
            for org_id, spec in r.mapping(s.get("orgs"), f"{p}.orgs").items()}
    ip = r.mapping(s.get("ip"), f"{p}.ip", ("rpm",))
    brute: BruteForce | None = None
    if s.get("brute_force") is not None:
        bp = f"{p}.brute_force"
        b = r.mapping(s.get("brute_force"), bp, ("max_failures", "max_key_failures", "window", "ban"))
        bd = BruteForce()
        brute = BruteForce(
            max_failures=r.value(b, "max_failures", bp, int, bd.max_failures, _int_at_least(1)),
            max_key_failures=r.value(b, "max_key_failures", bp, int, bd.max_key_failures, _int_at_least(0)),
            window_ms=int(r.value(b, "window", bp, float, bd.window_ms / 1000, _positive) * 1000),
            ban_ms=int(r.value(b, "ban", bp, float, bd.ban_ms / 1000, _positive) * 1000),
        )
    failure = r.value(s, "redis_failure", p, str, d.redis_failure)
    if failure not in ("open", "closed"):
        r.problem(f"{p}.redis_failure", f"must be 'open' (limit in-process) or 'closed' (refuse with 503), "
                  f"got {failure!r}")
        failure = d.redis_failure
    prefix = r.value(s, "redis_prefix", p, str, d.redis_prefix)
    if not prefix or len(prefix) > 64 or any(c.isspace() for c in prefix):
        r.problem(f"{p}.redis_prefix", "must be 1-64 characters without spaces")
        prefix = d.redis_prefix
    return LimitSettings(
        key=_quota(r, s.get("key"), f"{p}.key"),
        org=org,
        orgs=orgs,
        ip_rpm=r.value(ip, "rpm", f"{p}.ip", int, 0, _int_at_least(0)),
        brute_force=brute,
        allow=_cidrs(r, s, "allow", p),
        deny=_cidrs(r, s, "deny", p),
        ipv6_prefix=r.value(s, "ipv6_prefix", p, int, d.ipv6_prefix,
                            lambda v: None if 32 <= v <= 128 else "must be between 32 and 128"),
        default_output_tokens=r.value(s, "default_output_tokens", p, int, d.default_output_tokens,
                                      _int_at_least(0)),
        redis_failure=failure,
        redis_timeout_ms=r.value(s, "redis_timeout_ms", p, int, d.redis_timeout_ms,
                                 lambda v: None if 1 <= v <= 5000 else "must be between 1 and 5000"),
        redis_prefix=prefix,
        concurrency_lease=r.value(s, "concurrency_lease", p, float, d.concurrency_lease,
                                  lambda v: None if v >= 1 else "must be at least 1 (seconds)"),
    )


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


# ------------------------------------------------------------ key overrides


@dataclass(frozen=True, slots=True)
class KeyRules:
    """A key row's ``limits`` JSON, parsed once per cached identity."""

    quota: Quota
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()


def _override_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _override_networks(value: Any) -> tuple[IPNetwork, ...] | None:
    # A list of CIDRs, or one string of comma-separated CIDRs (what a scalar-only admin field can hold).
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > 1000:
        return None
    try:
        return parse_networks([str(v) for v in items if str(v).strip()])
    except ValueError:
        return None


def parse_key_rules(limits: Mapping[str, Any], default: Quota) -> tuple[KeyRules, list[str]]:
    """Overrides from a key row; a malformed entry is ignored (the default applies) and named."""
    bad: list[str] = []
    values = []
    for name in _QUOTA_KEYS:
        raw = limits.get(name)
        value = getattr(default, name)
        if raw is not None:
            parsed = _override_int(raw)
            if parsed is None:
                bad.append(name)
            else:
                value = parsed
        values.append(value)
    nets: list[tuple[IPNetwork, ...]] = []
    for name in ("allow", "deny"):
        raw = limits.get(name)
        parsed_nets: tuple[IPNetwork, ...] | None = ()
        if raw is not None:
            parsed_nets = _override_networks(raw)
            if parsed_nets is None:
                bad.append(name)
                parsed_nets = ()
        nets.append(parsed_nets)
    if "allow" in bad or "deny" in bad:
        # An IP list that cannot be read must not open the key up: it fails closed.
        nets[1] = _EVERYWHERE
    return KeyRules(Quota(*values), nets[0], nets[1]), bad


_REQUEST_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
_TOKEN_HEADERS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


_HeaderSpec = tuple[str, str, str, tuple[int, ...], tuple[str, ...]]
"""Three header names, the positions of the checks that may fill them, and those checks' limits as text."""


def _put_headers(headers: dict[str, str], remaining: Sequence[int], reset_ms: Sequence[int],
                 specs: tuple[_HeaderSpec, ...]) -> None:
    """The tightest requests limit and the tightest tokens limit, as OpenAI reports them."""
    for limit_name, remaining_name, reset_name, positions, limits in specs:
        at = 0
        if len(positions) > 1:
            at = min(range(len(positions)), key=lambda i: remaining[positions[i]])
        best = positions[at]
        left = remaining[best]
        ms = reset_ms[best]
        headers[limit_name] = limits[at]
        headers[remaining_name] = str(left) if left > 0 else "0"
        # what almost every reset is (a minute's window): looked up, not formatted
        headers[reset_name] = str(ms // 1000) + _FRACTIONS[ms % 1000] if 1000 <= ms < 60_000 else format_duration(ms)


_EVERYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


# ---------------------------------------------------------------- the state


@lru_cache(maxsize=16384)
def _ip_info(ip: str, v6_prefix: int) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None, str]:
    """The address and the subject its limits are counted under ("" when the IP is unknown)."""
    try:
        address = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return None, ""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif v6_prefix < 128:
            return address, "ip:" + str(ipaddress.ip_network(f"{address}/{v6_prefix}", strict=False))
    return address, "ip:" + str(address)


def _in(address: Any, networks: tuple[IPNetwork, ...]) -> bool:
    version = address.version
    return any(version == net.version and address in net for net in networks)


def format_duration(ms: int) -> str:
    """A duration as OpenAI's rate limit headers write it: "20ms", "1s", "6m0s", "1m1.5s"."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return _MILLISECONDS[ms]
    if ms < 60_000:
        return str(ms // 1000) + _FRACTIONS[ms % 1000]
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    out = f"{hours}h" if hours else ""
    return out + f"{minutes}m{whole}" + _FRACTIONS[fraction]


_MILLISECONDS = [f"{ms}ms" for ms in range(1000)]
_FRACTIONS = ["s"] + [f".{fraction:03d}".rstrip("0") + "s" for fraction in range(1, 1000)]
"""The seconds' tail by milliseconds: 0 -> "s", 500 -> ".5s", 25 -> ".025s"."""


@dataclass(slots=True)
class _Plan:
    """One identity's checks, compiled once and reused while the identity object stays the same.

    Auth hands out the same ``Identity`` for every request of a cached key, so a request builds no
    checks, subjects or releases of its own beyond its token reservation.
    """

    identity: Identity | None
    limits: Mapping[str, Any] | None
    org_limits: Mapping[str, Any] | None
    org_id: str | None
    rules: KeyRules | None
    """The key's own IP lists, when it has any."""
    checks: tuple[Check, ...]
    """Key and org checks; a TOKENS check is a template whose amount each request sets."""
    scopes: tuple[str, ...]
    tpm: int
    """The smallest TPM limit of the checks (0: none, the request's tokens are not estimated)."""
    leases: tuple[Release, ...]
    """The concurrency slots settle frees; the same for every request."""
    token_subjects: tuple[str, ...]
    """Where settle corrects the token reservation."""
    tokens_at: tuple[int, ...]
    """Positions of the TOKENS checks in ``checks``."""
    headers: tuple[tuple[_HeaderSpec, ...], tuple[_HeaderSpec, ...]]
    """The ``x-ratelimit-*`` headers to set: without, then with the IP's check in front (``with_ip``)."""


def _header_specs(checks: Sequence[Check], ip_rpm: int) -> tuple[tuple[_HeaderSpec, ...], tuple[_HeaderSpec, ...]]:
    def specs(all_checks: Sequence[Check]) -> tuple[_HeaderSpec, ...]:
        out = []
        for names, kind in ((_REQUEST_HEADERS, REQUESTS), (_TOKEN_HEADERS, TOKENS)):
            at = tuple(i for i, c in enumerate(all_checks) if c.kind == kind)
            if at:
                out.append((*names, at, tuple(str(all_checks[i].limit) for i in at)))
        return tuple(out)
    return specs(checks), specs([Check(REQUESTS, "ip", ip_rpm), *checks])


_NO_PLAN = _Plan(None, None, None, None, None, (), (), 0, (), (), (), _header_specs((), 0))


@dataclass(slots=True)
class _Admitted:
    """What admit took for one request, for settle."""

    backend: Counters
    plan: _Plan
    tokens: int


_LOCAL = object()
"""Refused without a state call: nothing to settle, nothing to count."""
_NOTHING_TO_SETTLE = object()
"""Admitted with requests-per-minute checks only: settle has nothing to undo."""


@lru_cache(maxsize=16384)
def _ip_check(subject: str, limit: int) -> Check:
    # Shared, never mutated: the backends only read checks.
    return Check(REQUESTS, subject, limit)


class RateLimiter:
    def __init__(self, settings: LimitSettings, state_url: str = "memory://",
                 model_caps: Mapping[str, int | None] | None = None) -> None:
        self.settings = settings
        self.state_url = state_url
        self.model_caps: Mapping[str, int | None] = model_caps or {}
        """Each model alias's configured max_output_tokens: the TPM reservation when a request sets none."""
        s = settings
        self.brute_force = s.brute_force
        self.pre_auth = bool(s.allow or s.deny or s.ip_rpm or s.brute_force)
        self.note_needed = bool(s.ip_rpm or s.brute_force)
        self.has_defaults = bool(s.key or s.org or s.orgs or s.ip_rpm)
        self.fail_closed = s.redis_failure == "closed"
        self.lease_ms = int(s.concurrency_lease * 1000)
        self.backend: Counters = MemoryCounters(sweep_interval=0)
        self.fallback = MemoryCounters()
        self._bans: dict[str, float] = {}
        """ip subject -> monotonic time the ban ends (learned locally, from the state, or the bus)."""
        self._blocked: dict[str, tuple[float, str, int]] = {}
        """subject -> (until, refusal code, limit): a used-up request rate, refused without a round trip."""
        self._plans: dict[str, _Plan] = {}
        """key id -> its compiled checks (see ``_Plan``)."""
        self._warned_rules: set[str] = set()
        self.ip_subjects = bool(s.ip_rpm or s.brute_force)
        self._in_process = True
        """The state is a MemoryCounters: called directly, without a coroutine."""
        self._bus: Any = None
        # counters for metrics and tests
        self.refused: dict[str, int] = {}
        self.fallback_decisions = 0
        self.unavailable = 0
        self.state_calls = 0
        """Admits and settles that reached the counters (in process, a lease, or Redis)."""

    # -- lifecycle

    async def start(self, bus: Any) -> None:
        self._bus = bus
        self.backend = open_counters(self.state_url, prefix=self.settings.redis_prefix,
                                     timeout=self.settings.redis_timeout_ms / 1000)
        self._in_process = isinstance(self.backend, MemoryCounters)
        await self.backend.start()
        await self.fallback.start()
        if bus is not None:
            bus.subscribe(self.on_bus)

    async def stop(self) -> None:
        await self.backend.close()
        await self.fallback.close()

    @property
    def redis(self) -> RedisCounters | None:
        return self.backend if isinstance(self.backend, RedisCounters) else None

    # -- bans and blocks known locally

    def on_bus(self, kind: str, value: str) -> None:
        if kind != BAN_EVENT:
            return
        subject, _, ms = value.rpartition(" ")
        if subject.startswith("ip:") and ms.isdigit():
            self._ban_locally(subject, int(ms))

    def _ban_locally(self, subject: str, ms: int) -> None:
        if len(self._bans) >= MAX_LOCAL_ENTRIES:
            now = time.monotonic()
            self._bans = {k: v for k, v in self._bans.items() if v > now}
        self._bans[subject] = time.monotonic() + ms / 1000

    def _block_locally(self, subject: str, ms: int, code: str, limit: int) -> None:
        if ms <= 0:
            return
        if len(self._blocked) >= MAX_LOCAL_ENTRIES:
            now = time.monotonic()
            self._blocked = {k: v for k, v in self._blocked.items() if v[0] > now}
        self._blocked[subject] = (time.monotonic() + ms / 1000, code, limit)

    def _blocked_ms(self, subject: str) -> tuple[int, str, int] | None:
        entry = self._blocked.get(subject)
        if entry is None:
            return None
        left = entry[0] - time.monotonic()
        if left <= 0:
            del self._blocked[subject]
            return None
        return math.ceil(left * 1000), entry[1], entry[2]

    def ban_ms(self, subject: str) -> int:
        until = self._bans.get(subject)
        if until is None:
            return 0
        left = until - time.monotonic()
        if left <= 0:
            del self._bans[subject]
            return 0
        return math.ceil(left * 1000)

    # -- authenticate: local only

    def before_auth(self, ctx: RequestContext) -> None:
        s = self.settings
        address, subject = _ip_info(ctx.client_ip, s.ipv6_prefix)
        if s.deny or s.allow:
            if address is None:
                if s.allow:
                    self._refuse_local(ctx, _not_allowed())
            elif (s.deny and _in(address, s.deny)) or (s.allow and not _in(address, s.allow)):
                self._refuse_local(ctx, _not_allowed())
        if not subject:
            return
        if self._bans:
            ms = self.ban_ms(subject)
            if ms:
                self._refuse_local(ctx, _banned(ms))
        if self._blocked:
            blocked = self._blocked_ms(subject)
            if blocked is not None:
                self._refuse_local(ctx, self._rate_error(blocked[1], blocked[0], blocked[2], "ip"))

    def _refuse_local(self, ctx: RequestContext, error: GatewayError) -> None:
        ctx.scratch[NAME] = _LOCAL
        self._count_refusal(error.code or "")
        raise error

    # -- admit: one round trip

    def rules_for(self, key_subject: str, limits: Mapping[str, Any]) -> KeyRules:
        """A key row's overrides (the plan cache keeps them); a malformed entry is warned about once."""
        rules, bad = parse_key_rules(limits, self.settings.key)
        if bad and key_subject not in self._warned_rules:
            if len(self._warned_rules) >= MAX_LOCAL_ENTRIES:
                self._warned_rules.clear()
            self._warned_rules.add(key_subject)
            log.warning("API key %s has malformed limits %s: bad numbers fall back to the defaults, a bad "
                        "allow/deny list refuses every IP", key_subject, sorted(bad))
        return rules

    def _org_quota(self, org_subject: str, overrides: Mapping[str, Any], base: Quota) -> Quota:
        """The org's quota with the store's overrides (rpm, tpm, concurrent; orgs have no IP lists)."""
        rules, bad = parse_key_rules(overrides, base)
        if bad and org_subject not in self._warned_rules:
            self._warned_rules.add(org_subject)
            log.warning("organization %s has malformed limits %s: they fall back to the configured ones",
                        org_subject, sorted(bad))
        return rules.quota

    def plan_for(self, identity: Identity) -> _Plan:
        key_id = identity.key_id or identity.account_id
        plan = self._plans.get(key_id)
        if plan is not None and plan.identity is identity and plan.limits is identity.limits \
                and plan.org_limits is identity.org_limits and plan.org_id == identity.org_id:
            return plan
        plan = self._compile(identity, "key:" + key_id)
        if len(self._plans) >= MAX_LOCAL_ENTRIES:
            self._plans.clear()
        self._plans[key_id] = plan
        return plan

    def _compile(self, identity: Identity, key_subject: str) -> _Plan:
        s = self.settings
        quota = s.key
        rules: KeyRules | None = None
        if identity.limits:
            rules = self.rules_for(key_subject, identity.limits)
            quota = rules.quota
        org_subject = org_quota = None
        if identity.org_id:
            org_subject = "org:" + identity.org_id
            org_quota = s.orgs.get(identity.org_id, s.org)
            if identity.org_limits:  # the store's override, name by name over the YAML's
                org_quota = self._org_quota(org_subject, identity.org_limits, org_quota)
        checks: list[Check] = []
        scopes: list[str] = []
        leases: list[Release] = []
        token_subjects: list[str] = []
        for subject, q, scope in ((key_subject, quota, "key"), (org_subject, org_quota, "org")):
            if subject is None or q is None or not q:
                continue
            if q.rpm:
                checks.append(Check(REQUESTS, subject, q.rpm))
                scopes.append(scope)
            if q.tpm:
                checks.append(Check(TOKENS, subject, q.tpm, 0))
                scopes.append(scope)
                token_subjects.append(subject)
            if q.concurrent:
                checks.append(Check(CONCURRENCY, subject, q.concurrent, 1, self.lease_ms))
                scopes.append(scope)
                leases.append(Release(CONCURRENCY, subject, 1, 0, self.lease_ms))
        tpm = min((c.limit for c in checks if c.kind == TOKENS), default=0)
        own_ips = rules if rules is not None and (rules.allow or rules.deny) else None
        return _Plan(identity, identity.limits, identity.org_limits, identity.org_id, own_ips, tuple(checks),
                     tuple(scopes), tpm,
                     tuple(leases), tuple(token_subjects),
                     tuple(i for i, c in enumerate(checks) if c.kind == TOKENS), _header_specs(checks, s.ip_rpm))

    async def admit(self, ctx: RequestContext) -> None:
        """Check and take every limit of the request, or refuse it (the hook calls ``admit_now``)."""
        pending = self.admit_now(ctx)
        if pending is not None:
            await pending

    def admit_now(self, ctx: RequestContext) -> Awaitable[None] | None:
        """In-process state: decided at once, returns None. Shared state: returns the round trip to await.

        Sync on purpose: the hook chain calls a plain function without a coroutine, and awaits what it
        returns, so the in-process path costs no coroutine at all.
        """
        s = self.settings
        identity = ctx.identity
        plan = self.plan_for(identity) if identity is not None else _NO_PLAN
        if plan.rules is not None:
            self._check_key_ips(ctx, plan.rules)
        checks: Sequence[Check] = plan.checks
        tokens = 0
        if plan.tpm:
            if ctx.body is not None:
                tokens = self.estimate_tokens(ctx)
                if tokens > plan.tpm:
                    self._refuse_too_large(plan, tokens)
            checks = list(checks)
            for i in plan.tokens_at:  # the templates stay untouched: other requests share them
                template = checks[i]
                checks[i] = Check(TOKENS, template.subject, template.limit, tokens)
        ip_subject = _ip_info(ctx.client_ip, s.ipv6_prefix)[1] if self.ip_subjects else ""
        with_ip = bool(s.ip_rpm and ip_subject)
        if with_ip:
            checks = [_ip_check(ip_subject, s.ip_rpm), *checks]
        if not checks:
            return None
        # Bans are known locally (own failures, the bus); the state is asked too when it is asked anyway.
        ban_subject = ip_subject if (s.brute_force and ip_subject) else None
        if self._blocked:
            self._refuse_if_blocked(ctx, checks, plan, with_ip)
        ctx.scratch[NAME] = _NOTHING_TO_SETTLE  # until something was taken
        self.state_calls += 1
        backend = self.backend
        if not self._in_process:
            left = backend.admit_locally(ctx.request_id, checks)  # room leased from Redis earlier
            if left is None:
                return self._admit_shared(ctx, plan, checks, with_ip, tokens, ban_subject)
            # Never with a concurrency slot (those are not leased): settle corrects the token leases only.
            _put_headers(ctx.response_headers, left[0], left[1], plan.headers[with_ip])
            if plan.token_subjects:
                ctx.scratch[NAME] = tokens  # the reservation, all settle needs
            return None
        decision = backend.acquire_now(ctx.request_id, checks, ban_subject)  # type: ignore[attr-defined]
        self._admitted(ctx, plan, checks, with_ip, tokens, decision, backend)
        return None

    async def _admit_shared(self, ctx: RequestContext, plan: _Plan, checks: Sequence[Check], with_ip: bool,
                            tokens: int, ban_subject: str | None) -> None:
        backend = self.backend
        try:
            decision = await backend.acquire(ctx.request_id, checks, ban_subject)
        except StateUnavailable:
            if self.fail_closed:
                self.unavailable += 1
                raise GatewayError(503, "Rate limits cannot be checked right now; retry shortly.",
                                   code="rate_limit_unavailable", headers={"Retry-After": "1"}) from None
            self.fallback_decisions += 1
            backend = self.fallback
            decision = backend.acquire_now(ctx.request_id, checks, ban_subject)
        self._admitted(ctx, plan, checks, with_ip, tokens, decision, backend)

    def _admitted(self, ctx: RequestContext, plan: _Plan, checks: Sequence[Check], with_ip: bool, tokens: int,
                  decision: Decision, backend: Counters) -> None:
        if not decision.allowed:
            self._refused(ctx, decision, checks, _scopes(plan, with_ip))
        _put_headers(ctx.response_headers, decision.remaining, decision.reset_ms, plan.headers[with_ip])
        if plan.token_subjects or plan.leases:
            ctx.scratch[NAME] = _Admitted(backend, plan, tokens)

    def _check_key_ips(self, ctx: RequestContext, rules: KeyRules) -> None:
        address, _ = _ip_info(ctx.client_ip, self.settings.ipv6_prefix)
        if address is None or (rules.deny and _in(address, rules.deny)) or (
                rules.allow and not _in(address, rules.allow)):
            self._count_refusal("ip_not_allowed")
            raise _not_allowed(for_key=True)

    def _refuse_too_large(self, plan: _Plan, tokens: int) -> None:
        for check, scope in zip(plan.checks, plan.scopes):
            if check.kind == TOKENS and tokens > check.limit:
                self._count_refusal("rate_limit_tokens")
                raise _too_large(tokens, check.limit, scope)

    def _refuse_if_blocked(self, ctx: RequestContext, checks: Sequence[Check], plan: _Plan, with_ip: bool) -> None:
        # A request rate known to be used up is refused without asking the state again.
        for check, scope in zip(checks, _scopes(plan, with_ip)):
            if check.kind == REQUESTS:
                blocked = self._blocked_ms(check.subject)
                if blocked is not None:
                    ctx.scratch[NAME] = _LOCAL
                    self._count_refusal(blocked[1])
                    raise self._rate_error(blocked[1], blocked[0], blocked[2], scope)

    def _refused(self, ctx: RequestContext, decision: Decision, checks: Sequence[Check],
                 scopes: Sequence[str]) -> None:
        retry = max(decision.retry_ms, 1)
        if decision.refused == BANNED:
            _, subject = _ip_info(ctx.client_ip, self.settings.ipv6_prefix)
            self._ban_locally(subject, retry)
            self._count_refusal("ip_banned")
            raise _banned(retry)
        check = checks[decision.refused]
        scope = scopes[decision.refused]
        if check.kind == REQUESTS:
            code = "ip_rate_limit" if scope == "ip" else "rate_limit_requests"
            self._block_locally(check.subject, retry, code, check.limit)
            ctx.response_headers.update({
                "x-ratelimit-limit-requests": str(check.limit), "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": format_duration(retry)})
        elif check.kind == TOKENS:
            code = "rate_limit_tokens"
            ctx.response_headers.update({
                "x-ratelimit-limit-tokens": str(check.limit),
                "x-ratelimit-reset-tokens": format_duration(retry)})
        else:
            code = "concurrency_limit"
        self._count_refusal(code)
        raise self._rate_error(code, retry, check.limit, scope, check.amount)

    def _rate_error(self, code: str, retry_ms: int, limit: int, scope: str, amount: int = 1) -> GatewayError:
        where = _SCOPE_TEXT.get(scope, "")
        wait = format_duration(retry_ms)
        if code == "rate_limit_tokens":
            message = (f"Rate limit reached for tokens per minute (TPM) {where}: limit {limit}, "
                       f"requested ~{amount}. Please try again in {wait}.")
        elif code == "concurrency_limit":
            message = f"Too many concurrent requests {where}: limit {limit}. Please retry when one has finished."
        else:
            message = f"Rate limit reached for requests per minute (RPM) {where}: limit {limit}. " \
                      f"Please try again in {wait}."
        return GatewayError(429, message, code=code, headers=_retry_headers(retry_ms))

    def estimate_tokens(self, ctx: RequestContext) -> int:
        """Prompt estimated from the body (kept nowhere) plus the output the request may produce."""
        prompt = ctx.prompt_estimate()
        if ctx.endpoint == "embeddings":
            return prompt
        cap = ctx.output_cap()
        if cap is None:
            cap = self.model_caps.get(ctx.model or "") or self.settings.default_output_tokens
        return prompt + cap

    # -- settle

    async def settle(self, ctx: RequestContext) -> None:
        """Give back what admit took (the hook calls ``settle_now``)."""
        pending = self.settle_now(ctx)
        if pending is not None:
            await pending

    def settle_now(self, ctx: RequestContext) -> Awaitable[None] | None:
        """Correct the token reservation and free the slots without waiting: in-process at once, in Redis
        batched with the other releases of this loop iteration. Returns the IP note to await, if any."""
        state = ctx.scratch.get(NAME)
        if state is None:
            return self._note(ctx) if self.note_needed else None
        if state.__class__ is int:  # admitted from window leases, with this token reservation
            self.state_calls += 1
            self.backend.settle_locally(ctx.request_id, state, _used_tokens(ctx, state))
            return None
        if state.__class__ is not _Admitted:
            return None  # refused, or nothing taken that settle must give back
        self.state_calls += 1
        try:
            state.backend.settle_soon(ctx.request_id, _releases(ctx, state))
        except StateUnavailable:
            pass  # leases and reservations expire on their own
        return None

    async def _note(self, ctx: RequestContext) -> None:
        s = self.settings
        _, ip_subject = _ip_info(ctx.client_ip, s.ipv6_prefix)
        if not ip_subject:
            return
        failed = self.brute_force is not None and ctx.status == 401
        if not failed and not s.ip_rpm:
            return
        ip_check = Check(REQUESTS, ip_subject, s.ip_rpm) if s.ip_rpm else None
        key_subject = None
        if failed:
            parsed = parse_key(extract_key(ctx.headers))
            if parsed is not None:
                key_subject = "kid:" + parsed.public_id
        failure = self.brute_force if failed else None
        try:
            self.state_calls += 1
            noted = await self.backend.note(ctx.request_id, ip_check, ip_subject, failure, key_subject)
        except StateUnavailable:
            self.fallback_decisions += 1
            noted = await self.fallback.note(ctx.request_id, ip_check, ip_subject, failure, key_subject)
        if noted.block_ms > 0 and ip_check is not None:
            self._block_locally(ip_subject, noted.block_ms, "ip_rate_limit", ip_check.limit)
        if noted.ban_ms > 0:
            self._ban_locally(ip_subject, noted.ban_ms)
            if noted.new_ban:
                log.warning("banned %s for %ds after repeated failed authentications", ip_subject,
                            noted.ban_ms // 1000)
                if self._bus is not None:
                    try:
                        await self._bus.publish(BAN_EVENT, f"{ip_subject} {noted.ban_ms}")
                    except Exception:
                        log.warning("could not announce a ban to other instances")

    def _count_refusal(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1


def _scopes(plan: _Plan, with_ip: bool) -> tuple[str, ...]:
    return ("ip", *plan.scopes) if with_ip else plan.scopes


def _releases(ctx: RequestContext, state: _Admitted) -> Sequence[Release]:
    """The token corrections (to the request's real usage) and the slots to free."""
    plan = state.plan
    if not plan.token_subjects:
        return plan.leases
    actual = _used_tokens(ctx, state.tokens)
    tokens = [Release(TOKENS, subject, state.tokens, actual, WINDOW_MS) for subject in plan.token_subjects]
    return tokens + list(plan.leases) if plan.leases else tokens


def _used_tokens(ctx: RequestContext, reserved: int) -> int:
    """What the request really used, which its token reservation is corrected to."""
    usage = ctx.usage
    actual = usage.prompt_tokens + usage.completion_tokens
    if not actual and ctx.first_byte_at is not None and (ctx.status < 400 or ctx.client_disconnected):
        return reserved  # answered without counts: keep the estimate
    # else nothing was generated (refused, failed upstream, an error answer): release it all
    return actual


_SCOPE_TEXT = {"key": "on this API key", "org": "for your organization", "ip": "for your IP address"}


def _retry_headers(retry_ms: int) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(retry_ms / 1000))), "retry-after-ms": str(retry_ms)}


def _not_allowed(for_key: bool = False) -> GatewayError:
    where = "this API key" if for_key else "this gateway"
    return GatewayError(403, f"Requests from your IP address are not allowed for {where}.", code="ip_not_allowed")


def _banned(retry_ms: int) -> GatewayError:
    return GatewayError(403, "Too many failed authentications from your IP address; it is blocked for "
                        f"{format_duration(retry_ms)}.", code="ip_banned", headers=_retry_headers(retry_ms))


def _too_large(tokens: int, limit: int, scope: str) -> GatewayError:
    return GatewayError(429, f"Request too large for tokens per minute (TPM) {_SCOPE_TEXT[scope]}: limit {limit}, "
                        f"requested ~{tokens}. Send a smaller request or a lower max_tokens.",
                        code="rate_limit_tokens", headers=_retry_headers(WINDOW_MS))


# -------------------------------------------------------------------- hooks

LIMITER: web.AppKey[RateLimiter] = web.AppKey("nexgate_plugins.ratelimit", RateLimiter)


@hookimpl
def nexgate_check_config(config: Config) -> list[str]:
    problems: list[str] = []
    parse_limit_settings(config, problems)
    return problems


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    app[LIMITER] = RateLimiter(parse_limit_settings(config, []), config.state_url,
                               {alias: route.max_output_tokens for alias, route in config.models.items()})


@hookimpl
async def nexgate_startup(app: web.Application) -> None:
    limiter = app[LIMITER]
    await limiter.start(app.get(BUS))
    _register_metrics(app, limiter)


@hookimpl
async def nexgate_shutdown(app: web.Application) -> None:
    await app[LIMITER].stop()


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
    if limiter.note_needed or NAME in ctx.scratch:
        return limiter.settle_now(ctx)
    return None


# ------------------------------------------------------------------ metrics


def _register_metrics(app: web.Application, limiter: RateLimiter) -> None:
    """Counters exported by the metrics plugin, read only when /metrics is scraped."""
    def collect() -> Iterator[Any]:
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

    add_collector(app, collect)
