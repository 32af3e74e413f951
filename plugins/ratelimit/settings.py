"""The ``limits:`` section, and the per-key overrides in a key row's ``limits`` JSON."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Mapping


from nexgate_proxy.clientip import IPNetwork, parse_networks
from nexgate_proxy.config import Config, ConfigReader, ConfigSection

from .counters import (
    DEFAULT_PREFIX,
    BruteForce,
)


_EVERYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
"""A deny list that cannot be read denies everything (fail closed)."""
_QUOTA_KEYS = ("rpm", "tpm", "concurrent")


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
    brute_force: BruteForce | None = BruteForce()
    """On unless turned off (``brute_force: false``): secure by default."""
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


def parse_limit_settings(r: ConfigReader, s: dict[str, Any], config: Config) -> LimitSettings:
    p = "limits"
    d = LimitSettings()
    org = _quota(r, s.get("org"), f"{p}.org")
    orgs = {str(org_id): _quota(r, spec, f"{p}.orgs.{org_id}", org)
            for org_id, spec in r.mapping(s.get("orgs"), f"{p}.orgs").items()}
    ip = r.mapping(s.get("ip"), f"{p}.ip", ("rpm",))
    brute = _brute_force(r, s.get("brute_force"), f"{p}.brute_force")
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


def _brute_force(r: ConfigReader, raw: Any, bp: str) -> BruteForce | None:
    """On by default; ``false`` turns it off, and so do both budgets at 0."""
    if raw is False:
        return None
    if raw is None or raw is True:
        return BruteForce()
    b = r.mapping(raw, bp, ("max_failures", "max_key_failures", "window", "ban"))
    bd = BruteForce()
    brute = BruteForce(
        max_failures=r.value(b, "max_failures", bp, int, bd.max_failures, _int_at_least(0)),
        max_key_failures=r.value(b, "max_key_failures", bp, int, bd.max_key_failures, _int_at_least(0)),
        window_ms=int(r.value(b, "window", bp, float, bd.window_ms / 1000, _positive) * 1000),
        ban_ms=int(r.value(b, "ban", bp, float, bd.ban_ms / 1000, _positive) * 1000),
    )
    return brute if brute.max_failures or brute.max_key_failures else None


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


LIMITS_SECTION = ConfigSection("limits", parse_limit_settings, (
    "key", "org", "orgs", "ip", "brute_force", "allow", "deny", "ipv6_prefix", "default_output_tokens",
    "redis_failure", "redis_timeout_ms", "redis_prefix", "concurrency_lease"),
    "Rate limits per key, organization and IP, IP allow/deny lists and brute-force bans.")


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




def raised_limit(requested: Mapping[str, Any], ceiling: Quota) -> tuple[str, str, bool] | None:
    """The first quota in a key's ``limits`` that is not a lowering of the operator's ``ceiling``: its name,
    why, and whether it is a raise (else a value that is not a whole number).

    Users and organization admins may only tighten their keys: a value above the operator's, or 0
    ("no limit") where the operator set one, is a raise only the superadmin may give. A quota must be
    a whole number here (a value the rate limiter could not read would silently mean the default).
    """
    for name in _QUOTA_KEYS:
        if name not in requested:
            continue
        value = requested[name]
        limit = getattr(ceiling, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return name, "must be a whole number (0: no limit)", False
        if limit and (value == 0 or value > limit):
            shown = "0 (no limit)" if value == 0 else str(value)
            return name, f"is {shown}, above the gateway's limit of {limit}; only the superadmin raises limits", True
    return None
