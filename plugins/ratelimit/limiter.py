"""The rate limiter: plans per identity, leased and shared admits, settles, bans (see the package doc)."""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Awaitable, Mapping, Sequence


from nexgate_proxy import GatewayError, Identity, RequestContext, StashKey
from nexgate_proxy.clientip import IPNetwork
from nexgate_proxy.iplog import ip_tag
from nexgate_proxy.state.redis import RedisClient, StateUnavailable

from .counters import (
    BANNED,
    CONCURRENCY,
    REQUESTS,
    TOKENS,
    Check,
    Counters,
    Decision,
    MemoryCounters,
    RedisCounters,
    Release,
    open_counters,
)
from nexgate_proxy.keys import extract_key, parse_key
from nexgate_proxy.proxy import new_request_id

from .settings import KeyRules, LimitSettings, Quota, parse_key_rules


log = logging.getLogger("nexgate.ratelimit")

WINDOW_MS = 60_000
BAN_EVENT = "ratelimit.ban"
"""Bus message kind: value is ``"<redis_prefix> <ip subject> <milliseconds>"`` (gateways sharing a Redis
but not a prefix are different deployments: they do not share bans)."""
MAX_LOCAL_ENTRIES = 100_000


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


ADMISSION: StashKey[_Admitted | int | None] = StashKey("ratelimit.admission")
"""What admit decided, for settle: absent, admit never decided (settle may count the request against its IP);
None, nothing to give back (refused without a state call, or requests-per-minute checks only); an int, the
tokens reserved from window leases; ``_Admitted``, what a backend took."""


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
        self._key_locks: dict[str, float] = {}
        """public key id -> monotonic time its failure budget is back (see ``key_locked_ms``)."""
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

    async def start(self, bus: Any, redis: RedisClient | None = None) -> None:
        """``redis``: the process's Redis client, when the state is on Redis."""
        self._bus = bus
        self.backend = open_counters(self.state_url, redis=redis, prefix=self.settings.redis_prefix,
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
        prefix, _, rest = value.partition(" ")
        subject, _, ms = rest.rpartition(" ")
        if prefix == self.settings.redis_prefix and subject.startswith("ip:") and ms.isdigit():
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
        refusal = self.check(ctx.client_ip)  # counted as a refusal there
        if refusal is not None:
            ctx.stash[ADMISSION] = None  # nothing taken: settle gives nothing back and counts nothing
            raise refusal
        if self._blocked:
            subject = _ip_info(ctx.client_ip, self.settings.ipv6_prefix)[1]
            blocked = self._blocked_ms(subject) if subject else None
            if blocked is not None:
                self._refuse_local(ctx, self._rate_error(blocked[1], blocked[0], blocked[2], "ip"))

    # -- the abuse guard (``nexgate_proxy.abuse.AbuseGuard``) other surfaces share

    def check(self, ip: str) -> GatewayError | None:
        """Deny/allow lists and bans: local dict lookups."""
        s = self.settings
        if s.deny or s.allow:
            address = _ip_info(ip, s.ipv6_prefix)[0]
            if address is None:
                if s.allow:
                    return self._refusal(_not_allowed())
            elif (s.deny and _in(address, s.deny)) or (s.allow and not _in(address, s.allow)):
                return self._refusal(_not_allowed())
        if self._bans:
            subject = _ip_info(ip, s.ipv6_prefix)[1]
            ms = self.ban_ms(subject) if subject else 0
            if ms:
                return self._refusal(_banned(ms))
        return None

    def count(self, ip: str, *, failed: bool = False, key_id: str | None = None) -> Awaitable[None] | None:
        if not (self.settings.ip_rpm or (failed and self.brute_force is not None)):
            return None
        return self._count(ip, failed, key_id)

    def key_locked_ms(self, key_id: str) -> int:
        entry = self._key_locks.get(key_id)
        if entry is None:
            return 0
        left = entry - time.monotonic()
        if left <= 0:
            del self._key_locks[key_id]
            return 0
        return math.ceil(left * 1000)

    def _lock_key(self, key_id: str, failures: int) -> None:
        brute = self.brute_force
        if brute is None or not brute.max_key_failures or failures < brute.max_key_failures:
            return
        if len(self._key_locks) >= MAX_LOCAL_ENTRIES:
            now = time.monotonic()
            self._key_locks = {k: v for k, v in self._key_locks.items() if v > now}
        # From the last failure: an attack that goes on keeps its key id locked.
        self._key_locks[key_id] = time.monotonic() + brute.window_ms / 1000

    def _refusal(self, error: GatewayError) -> GatewayError:
        self._count_refusal(error.code or "")
        return error

    def _refuse_local(self, ctx: RequestContext, error: GatewayError) -> None:
        ctx.stash[ADMISSION] = None
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
        ctx.stash[ADMISSION] = None  # until something was taken
        self.state_calls += 1
        backend = self.backend
        if not self._in_process:
            left = backend.admit_locally(ctx.request_id, checks)  # room leased from Redis earlier
            if left is None:
                return self._admit_shared(ctx, plan, checks, with_ip, tokens, ban_subject)
            # Never with a concurrency slot (those are not leased): settle corrects the token leases only.
            _put_headers(ctx.response_headers, left[0], left[1], plan.headers[with_ip])
            if plan.token_subjects:
                ctx.stash[ADMISSION] = tokens  # the reservation, all settle needs
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
            ctx.stash[ADMISSION] = _Admitted(backend, plan, tokens)

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
                    ctx.stash[ADMISSION] = None
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
        stash = ctx.stash
        if ADMISSION not in stash:  # admit never decided it: count it against its IP, if anything counts
            if self.settings.ip_rpm or (ctx.status == 401 and self.brute_force is not None):
                return self._note(ctx)
            return None
        state = stash[ADMISSION]
        if state is None:
            return None  # refused, or nothing taken that settle must give back
        if isinstance(state, int):  # admitted from window leases, with this token reservation
            self.state_calls += 1
            self.backend.settle_locally(ctx.request_id, state, _used_tokens(ctx, state))
            return None
        self.state_calls += 1
        try:
            state.backend.settle_soon(ctx.request_id, _releases(ctx, state))
        except StateUnavailable:
            pass  # leases and reservations expire on their own
        return None

    def _note(self, ctx: RequestContext) -> Awaitable[None]:
        """A request that never reached admit: its IP's rate, and a 401 as a failed authentication."""
        failed = ctx.status == 401
        key_id = None
        if failed:
            parsed = parse_key(extract_key(ctx.headers))
            key_id = parsed.public_id if parsed is not None else None
        return self._count(ctx.client_ip, failed, key_id, ctx.request_id)

    async def _count(self, ip: str, failed: bool, key_id: str | None, member: str | None = None) -> None:
        s = self.settings
        _, ip_subject = _ip_info(ip, s.ipv6_prefix)
        if not ip_subject:
            return
        failure = self.brute_force if failed else None
        if failure is None and not s.ip_rpm:
            return
        ip_check = Check(REQUESTS, ip_subject, s.ip_rpm) if s.ip_rpm else None
        key_subject = "kid:" + key_id if failure is not None and key_id else None
        member = member or new_request_id()
        try:
            self.state_calls += 1
            noted = await self.backend.note(member, ip_check, ip_subject, failure, key_subject)
        except StateUnavailable:
            self.fallback_decisions += 1
            noted = await self.fallback.note(member, ip_check, ip_subject, failure, key_subject)
        if key_subject is not None and key_id is not None:
            self._lock_key(key_id, noted.key_failures)
        if noted.block_ms > 0 and ip_check is not None:
            self._block_locally(ip_subject, noted.block_ms, "ip_rate_limit", ip_check.limit)
        if noted.ban_ms > 0:
            self._ban_locally(ip_subject, noted.ban_ms)
            if noted.new_ban:
                log.warning("banned %s for %ds after repeated failed authentications", ip_tag(ip_subject),
                            noted.ban_ms // 1000)
                if self._bus is not None:
                    try:
                        await self._bus.publish(BAN_EVENT, f"{s.redis_prefix} {ip_subject} {noted.ban_ms}")
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


