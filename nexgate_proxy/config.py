"""The one YAML config file: load, interpolate ``${ENV}``, validate, freeze.

Every top-level section is declared once as a :class:`ConfigSection` (its name,
parser, keys and a one-line description): the core's own sections here, each
plugin's through the ``nexgate_config_sections`` hook. ``parse_config`` parses
the core's sections; the plugins' sections are parsed once the plugins are
known (``nexgate_proxy.plugins.configure``, run by ``build_app``), and a plugin
reads its typed settings with ``config.section(SECTION)``.

Every problem is reported with the file, the key path and what to do about it,
and all problems are reported at once: the core's, every section's and unknown
top-level keys together. A config with any problem never starts the server.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Callable, Generic, Mapping, TypeVar

import yaml

from .clientip import IPNetwork, parse_networks
from .cooldown import CooldownSettings

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
KNOWN_PROVIDER_TYPES_HINT = "openai, anthropic, azure, gemini, echo"


class ConfigError(Exception):
    """The config has problems; ``problems`` lists each as "key.path: what is wrong"."""

    def __init__(self, source: str, problems: list[str], partial: Config | None = None) -> None:
        self.source = source
        self.problems = problems
        self.partial = partial
        """What parsed of the core sections, so the plugins' sections can be checked too (one pass)."""
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


# ------------------------------------------------------------------ model


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts in seconds."""

    connect: float = 10.0
    first_byte: float = 300.0
    """Until the upstream's response headers; reasoning models can think for minutes."""
    idle: float = 120.0
    """Longest silence between two chunks of a response."""
    total: float = 900.0


@dataclass(frozen=True, slots=True)
class CorsConfig:
    """Cross-origin access for browser apps; off while ``allow_origins`` is empty."""

    allow_origins: tuple[str, ...] = ()
    """Exact origins (``https://app.example.com``), or ``*`` for any (never with credentials)."""
    allow_credentials: bool = False
    """Let browsers send cookies / HTTP auth along; API keys in headers do not need it."""
    max_age: int = 600
    """Seconds a browser may cache a preflight answer."""

    @property
    def enabled(self) -> bool:
        return bool(self.allow_origins)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    grace_period: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    access_log: bool = False
    trusted_proxies: tuple[IPNetwork, ...] = ()
    """Peers whose X-Forwarded-For is believed (load balancers in front of NexGate)."""
    cors: CorsConfig = field(default_factory=CorsConfig)
    header_timeout: float = 10.0
    """Seconds a client has to send a request's headers (slowloris): from connecting, or from the
    first byte of the next request on a kept-alive connection."""
    body_timeout: float = 30.0
    """Longest silence while a request body is arriving; then 408."""
    keepalive_timeout: float = 75.0
    """An idle kept-alive connection is closed after this many seconds."""
    max_connections: int = 4096
    """Open client connections of this process together; past it new ones are closed at once. 0 = no cap."""
    max_connections_per_ip: int = 256
    """Open client connections of one peer address (the socket's, not X-Forwarded-For). 0 = no cap."""
    server_header: str = "NexGate"
    """The `Server` response header; empty = none."""
    gc_thresholds: tuple[int, int, int] = (700, 10, 1000)
    """The cyclic collector's ``gc.set_threshold``, applied at startup. Python's default third value
    is 10; a full pass scans every object the open requests hold (80-206 ms with 900 streams open, benchmarks/README.md)
    and finds next to nothing, so it runs 100 times less often."""


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_response_bytes: int = 64 * 1024 * 1024
    max_connections: int = 1000


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    type: str
    base_url: str
    api_key: str = field(default="", repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    options: Mapping[str, Any] = field(default_factory=dict)
    cooldown: CooldownSettings = field(default_factory=CooldownSettings)
    """Its targets' circuit breaker (a model's own ``cooldown`` overrides it key by key)."""
    max_concurrent: int = 0
    """Requests in flight to it per process; past it 503 + Retry-After at once (0: no cap of its own)."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens, per token class; an optional class left out costs its base rate.

    ``cached_input`` (cache reads), ``cache_write`` (prompt tokens written to the cache) and
    ``audio_input`` default to ``input``; ``cache_write_1h`` (Anthropic's one-hour writes) to
    ``cache_write``; ``audio_output`` to ``output``.
    """

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    audio_input: Decimal | None = None
    audio_output: Decimal | None = None


PRICE_KEYS = ("input", "output", "cached_input", "cache_write", "cache_write_1h", "audio_input", "audio_output")


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream that can serve a model alias."""

    provider: str
    model: str
    weight: int = 1
    price: Price | None = None
    """What this target costs: its own ``price``, else its model's; None when unpriced or free."""
    alias: str = ""
    """The model alias whose route lists this target (a fallback's alias when reached through one)."""
    cooldown: CooldownSettings = field(default_factory=CooldownSettings)
    """Its circuit breaker: the model's ``cooldown`` over its provider's over the defaults."""
    rpm: int | None = None
    """Requests per minute the operator may send it (a provider's quota); skipped at the cap."""
    tpm: int | None = None
    """Tokens (prompt + completion) per minute it may take; skipped at the cap."""


STRATEGIES = ("weighted", "priority", "least-latency", "lowest-cost")
"""How a model orders its own targets (see nexgate_plugins.routing)."""


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """Calling the same target again after a retriable failure, before any byte reached the client."""

    retries: int = 0
    """Extra calls to one target after a connect error, timeout, 429 or 5xx; 0 = straight to the next
    (the default: falling back beats calling a failing target again, and each retry counts toward its breaker)."""
    backoff: float = 0.2
    """Seconds before the first retry, doubled for each further one (with jitter: 50-100% of it)."""
    max_backoff: float = 2.0
    max_attempts: int = 8
    """Upstream calls per request, retries and fallbacks together."""


@dataclass(frozen=True, slots=True)
class ModelRoute:
    alias: str
    targets: tuple[Target, ...]
    fallbacks: tuple[str, ...] = ()
    chain: tuple[str, ...] = ()
    """This alias, then every model reached through fallbacks, transitively and breadth-first
    (the model's own fallbacks in order, then theirs), each once: the order routing tries them in."""
    timeouts: Timeouts = field(default_factory=Timeouts)
    price: Price | None = None
    free: bool = False
    max_output_tokens: int | None = None
    strategy: str = "weighted"
    """How its targets are ordered: one of ``STRATEGIES``."""
    retry: RetrySettings = field(default_factory=RetrySettings)


@dataclass(frozen=True, slots=True)
class PluginsConfig:
    modules: tuple[str, ...] = ()
    directory: str | None = None
    disable: tuple[str, ...] = ()
    entrypoints: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    source: str = "<defaults>"
    server: ServerConfig = field(default_factory=ServerConfig)
    storage_url: str = "sqlite:///./nexgate.db"
    storage_migrate_on_start: bool = True
    """Apply pending migrations at start (safe with several instances); else refuse an unmigrated database."""
    state_url: str = "memory://"
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    models: Mapping[str, ModelRoute] = field(default_factory=dict)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    settings: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The parsed plugin sections by name; read them with :meth:`section`."""
    unparsed: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The interpolated top-level entries the core does not own, until the plugins' sections parse them.
    For the core only: a plugin reads ``config.section(...)``."""

    def section(self, section: ConfigSection[T]) -> T:
        """The typed settings of a declared section (its defaults when the YAML leaves it out)."""
        try:
            return self.settings[section.name]  # type: ignore[no-any-return]
        except KeyError:
            raise LookupError(
                f"config section '{section.name}' is not parsed: sections are parsed once the plugins are known "
                "(build_app, or nexgate_proxy.plugins.resolve_config); is its plugin registered?") from None

    def secrets(self) -> list[str]:
        """Every configured credential, for log scrubbing and leak tests."""
        return [p.api_key for p in self.providers.values() if p.api_key]


T = TypeVar("T")


@dataclass(frozen=True, slots=True, eq=False)
class ConfigSection(Generic[T]):
    """A top-level config section, declared once by its owner (a plugin's ``nexgate_config_sections``).

    The core checks the section's keys against ``keys`` (unknown ones are problems with a hint),
    then calls ``parse(reader, section, config)`` once with the section's mapping (empty when the
    YAML leaves the section out) and the config with the core's sections parsed (for checks across
    sections). The parser records problems through the reader, with their key paths, and returns
    the typed settings, using defaults where a value is bad. ``config.section(THIS)`` returns them.
    """

    name: str
    parse: Callable[[ConfigReader, dict[str, Any], Config], T]
    keys: tuple[str, ...]
    """The section's own keys (nested mappings are the parser's to check); config/nexgate.yaml shows each."""
    description: str
    """One line for people: what the section configures."""
    entries: bool = False
    """The section maps names (chosen by the user) to entries, and ``keys`` are each entry's keys:
    the parser then gets ``{name: entry mapping}``, each entry's keys checked."""

    def mapping(self, r: ConfigReader, raw: Any) -> dict[str, Any]:
        """The section's mapping from the YAML, its keys (or its entries' keys) checked."""
        if not self.entries:
            return r.mapping(raw, self.name, self.keys)
        return {name: r.mapping(entry, _join(self.name, name), self.keys)
                for name, entry in r.mapping(raw, self.name).items()}


# ------------------------------------------------------------- interpolation


def interpolate(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``."""
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name in env and (env[name] != "" or default is None):
                return env[name]
            if default is not None:
                return default
            problems.append(
                f"{path}: environment variable {name} is not set "
                f"(set it, or give a default: ${{{name}:-value}})"
            )
            return ""

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{path}.{k}" if path else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


# ------------------------------------------------------------------ reading


class ConfigReader:
    """Typed access to a YAML mapping that records problems with their key paths."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, raw: Any, path: str, known: tuple[str, ...] | None = None) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problem(path, f"expected a mapping, got {_kind(raw)}")
            return {}
        if known is not None:
            for key in raw:
                if key not in known:
                    hint = difflib.get_close_matches(str(key), known, n=1)
                    suggestion = f"; did you mean '{hint[0]}'?" if hint else f" (known: {', '.join(known)})"
                    self.problem(_join(path, key), f"unknown key{suggestion}")
        return raw

    def value(
        self,
        section: dict[str, Any],
        key: str,
        path: str,
        kind: type,
        default: Any,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        here = _join(path, key)
        if key not in section or section[key] is None:
            return default
        raw = section[key]
        value = _coerce(raw, kind)
        if value is None:
            self.problem(here, f"expected {_kind_name(kind)}, got {raw!r}")
            return default
        if check is not None:
            message = check(value)
            if message:
                self.problem(here, message)
                return default
        return value


def _coerce(raw: Any, kind: type) -> Any:
    # Values from ${ENV} arrive as strings; accept them where a number or bool is expected.
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "yes", "no", "1", "0"):
            return raw.lower() in ("true", "yes", "1")
        return None
    if kind is int:
        if isinstance(raw, bool):
            return None
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"-?\d+", raw.strip()):
            return int(raw)
        return None
    if kind is float:
        if isinstance(raw, bool):
            return None
        if isinstance(raw, (int, float)):
            return float(raw)
        try:
            return float(raw) if isinstance(raw, str) else None
        except ValueError:
            return None
    if kind is Decimal:
        if isinstance(raw, bool):
            return None
        try:
            # str() first: a YAML float like 0.15 must become Decimal("0.15"), not its binary value.
            value = Decimal(str(raw)) if isinstance(raw, (int, float, str)) else None
        except InvalidOperation:
            return None
        # NaN and Infinity are no price (and NaN cannot even be compared).
        return value if value is not None and value.is_finite() else None
    if kind is str:
        return raw if isinstance(raw, str) else (str(raw) if isinstance(raw, (int, float)) else None)
    if kind is list:
        return raw if isinstance(raw, list) else None
    return raw if isinstance(raw, kind) else None


def _kind(raw: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string"}.get(type(raw), type(raw).__name__)


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list", Decimal: "a number"}.get(kind, kind.__name__)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a port number between 0 and 65535"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must not be negative"


# ---------------------------------------------------------------- sections
# The core's sections, declared like a plugin's: each ConfigSection is the one list of its keys.


def _timeouts(r: ConfigReader, raw: Any, path: str, base: Timeouts) -> Timeouts:
    section = r.mapping(raw, path, ("connect", "first_byte", "idle", "total"))
    return Timeouts(
        connect=r.value(section, "connect", path, float, base.connect, _positive),
        first_byte=r.value(section, "first_byte", path, float, base.first_byte, _positive),
        idle=r.value(section, "idle", path, float, base.idle, _positive),
        total=r.value(section, "total", path, float, base.total, _positive),
    )


_COOLDOWN_KEYS = ("failures", "cooldown", "max_cooldown", "max_retry_after", "failure_ratio", "window", "min_calls")


def _cooldown(r: ConfigReader, raw: Any, path: str, base: CooldownSettings) -> CooldownSettings:
    s = r.mapping(raw, path, _COOLDOWN_KEYS)
    settings = CooldownSettings(
        failures=r.value(s, "failures", path, int, base.failures, _non_negative),
        cooldown=r.value(s, "cooldown", path, float, base.cooldown, _positive),
        max_cooldown=r.value(s, "max_cooldown", path, float, base.max_cooldown, _positive),
        max_retry_after=r.value(s, "max_retry_after", path, float, base.max_retry_after, _non_negative),
        failure_ratio=r.value(s, "failure_ratio", path, float, base.failure_ratio, _ratio),
        window=r.value(s, "window", path, float, base.window, _positive),
        min_calls=r.value(s, "min_calls", path, int, base.min_calls, _positive),
    )
    if settings.max_cooldown < settings.cooldown:
        r.problem(f"{path}.max_cooldown", f"must not be below cooldown ({settings.cooldown:g})")
    return settings


def _ratio(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


def _retry(r: ConfigReader, raw: Any, path: str) -> RetrySettings:
    s = r.mapping(raw, path, ("retries", "backoff", "max_backoff", "max_attempts"))
    d = RetrySettings()
    settings = RetrySettings(
        retries=r.value(s, "retries", path, int, d.retries, _non_negative),
        backoff=r.value(s, "backoff", path, float, d.backoff, _positive),
        max_backoff=r.value(s, "max_backoff", path, float, d.max_backoff, _positive),
        max_attempts=r.value(s, "max_attempts", path, int, d.max_attempts, _positive),
    )
    if settings.max_backoff < settings.backoff:
        r.problem(f"{path}.max_backoff", f"must not be below backoff ({settings.backoff:g})")
    return settings


def _server(r: ConfigReader, s: dict[str, Any], config: Config) -> ServerConfig:
    p = "server"
    d = ServerConfig()
    return ServerConfig(
        host=r.value(s, "host", p, str, d.host),
        port=r.value(s, "port", p, int, d.port, _port),
        workers=r.value(s, "workers", p, int, d.workers, _positive),
        grace_period=r.value(s, "grace_period", p, float, d.grace_period, _non_negative),
        max_body_bytes=r.value(s, "max_body_bytes", p, int, d.max_body_bytes, _positive),
        max_header_bytes=r.value(s, "max_header_bytes", p, int, d.max_header_bytes,
                                 lambda v: None if v >= 1024 else "must be at least 1024"),
        access_log=r.value(s, "access_log", p, bool, d.access_log),
        trusted_proxies=_networks(r, s, "trusted_proxies", p),
        cors=_cors(r, s.get("cors")),
        header_timeout=r.value(s, "header_timeout", p, float, d.header_timeout, _positive),
        body_timeout=r.value(s, "body_timeout", p, float, d.body_timeout, _positive),
        keepalive_timeout=r.value(s, "keepalive_timeout", p, float, d.keepalive_timeout, _positive),
        max_connections=r.value(s, "max_connections", p, int, d.max_connections, _non_negative),
        max_connections_per_ip=r.value(s, "max_connections_per_ip", p, int, d.max_connections_per_ip,
                                       _non_negative),
        server_header=r.value(s, "server_header", p, str, d.server_header, _header_value),
        gc_thresholds=_gc_thresholds(r, s.get("gc_thresholds"), d.gc_thresholds),
    )


def _gc_thresholds(r: ConfigReader, raw: Any, default: tuple[int, int, int]) -> tuple[int, int, int]:
    if raw is None:
        return default
    if (not isinstance(raw, list) or len(raw) != 3
            or not all(type(v) is int and v >= 0 for v in raw)):
        r.problem("server.gc_thresholds", f"expected three whole numbers of 0 or more, got {raw!r}")
        return default
    return (raw[0], raw[1], raw[2])


_ORIGIN = re.compile(r"^https?://[^/\s?#]+$")


def _cors(r: ConfigReader, raw: Any) -> CorsConfig:
    p = "server.cors"
    s = r.mapping(raw, p, ("allow_origins", "allow_credentials", "max_age"))
    d = CorsConfig()
    origins: list[str] = []
    for i, origin in enumerate(r.value(s, "allow_origins", p, list, [])):
        if not isinstance(origin, str) or not (origin == "*" or _ORIGIN.match(origin)):
            r.problem(f"{p}.allow_origins[{i}]", f"expected an origin like https://app.example.com "
                      f"(scheme and host, no path) or '*', got {origin!r}")
        else:
            origins.append(origin.lower())
    credentials = r.value(s, "allow_credentials", p, bool, d.allow_credentials)
    if credentials and "*" in origins:
        r.problem(f"{p}.allow_credentials", "cannot be true while allow_origins has '*': "
                  "list the origins that may send credentials")
    return CorsConfig(allow_origins=tuple(origins), allow_credentials=credentials,
                      max_age=r.value(s, "max_age", p, int, d.max_age, _non_negative))


def _header_value(v: str) -> str | None:
    return None if all(" " <= c <= "~" for c in v) else "must be printable ASCII on one line"


def _networks(r: ConfigReader, section: dict[str, Any], key: str, path: str) -> tuple[IPNetwork, ...]:
    values = r.value(section, key, path, list, [])
    networks: list[IPNetwork] = []
    for i, value in enumerate(values):
        try:
            networks += parse_networks([value])
        except ValueError as exc:
            r.problem(f"{path}.{key}[{i}]", str(exc))
    return tuple(networks)


def _url(r: ConfigReader, s: dict[str, Any], path: str, default: str, schemes: tuple[str, ...]) -> str:
    url = r.value(s, "url", path, str, default)
    if not url.startswith(schemes):
        r.problem(f"{path}.url", f"must start with one of {', '.join(schemes)}, got {url.split(':', 1)[0]!r}")
    return url


def _storage(r: ConfigReader, s: dict[str, Any], config: Config) -> tuple[str, bool]:
    return (_url(r, s, "storage", "sqlite:///./nexgate.db", ("sqlite://", "postgresql://", "postgres://")),
            r.value(s, "migrate_on_start", "storage", bool, True))


def _state(r: ConfigReader, s: dict[str, Any], config: Config) -> str:
    return _url(r, s, "state", "memory://", ("memory://", "redis://", "rediss://", "unix://"))


def _upstream(r: ConfigReader, s: dict[str, Any], config: Config) -> UpstreamConfig:
    p = "upstream"
    d = UpstreamConfig()
    return UpstreamConfig(
        timeouts=_timeouts(r, s.get("timeouts"), f"{p}.timeouts", d.timeouts),
        max_response_bytes=r.value(s, "max_response_bytes", p, int, d.max_response_bytes, _positive),
        max_connections=r.value(s, "max_connections", p, int, d.max_connections, _positive),
    )


def _providers(r: ConfigReader, entries: dict[str, Any], config: Config) -> dict[str, ProviderConfig]:
    out: dict[str, ProviderConfig] = {}
    for name, s in entries.items():
        p = f"providers.{name}"
        ptype = r.value(s, "type", p, str, "")
        if not ptype:
            r.problem(f"{p}.type", f"required (one of: {KNOWN_PROVIDER_TYPES_HINT}, or a plugin's type)")
        base_url = r.value(s, "base_url", p, str, "")
        if ptype != "echo":
            if not base_url:
                r.problem(f"{p}.base_url", "required, e.g. https://api.openai.com/v1")
            else:
                _check_base_url(r, f"{p}.base_url", base_url)
        headers = r.mapping(s.get("headers"), f"{p}.headers")
        for hk, hv in headers.items():
            if not isinstance(hv, str):
                r.problem(f"{p}.headers.{hk}", "header values must be strings")
        out[str(name)] = ProviderConfig(
            name=str(name),
            type=ptype,
            base_url=base_url.rstrip("/"),
            api_key=r.value(s, "api_key", p, str, ""),
            headers={str(k): str(v) for k, v in headers.items()},
            options=r.mapping(s.get("options"), f"{p}.options"),
            cooldown=_cooldown(r, s.get("cooldown"), f"{p}.cooldown", CooldownSettings()),
            max_concurrent=r.value(s, "max_concurrent", p, int, 0, _non_negative),
        )
    capped = sum(provider.max_concurrent for provider in out.values())
    pool = config.upstream.max_connections
    if pool and capped > pool:
        # Past the pool, requests would wait for a connection in silence instead of getting the cap's 503.
        r.problem("providers", f"the providers' max_concurrent add up to {capped}, above upstream.max_connections "
                  f"({pool}): raise upstream.max_connections or lower a cap")
    return out


def _check_base_url(r: ConfigReader, path: str, url: str) -> None:
    if not re.match(r"^https?://[^/\s]+", url):
        r.problem(path, f"must be an http(s) URL, got {url!r}")
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is no number
    except ValueError:
        r.problem(path, "is not a valid URL (check the host and the port)")
        return
    if "@" in parts.netloc:
        # Never echo the URL: it holds a secret. Credentials in a URL end up in logs and errors.
        r.problem(path, "must not carry credentials (user:password@); put the provider's key in "
                        "api_key, or an Authorization header in headers")


def _price(r: ConfigReader, raw: Any, path: str) -> Price | None:
    if raw is None:
        return None
    s = r.mapping(raw, path, PRICE_KEYS)
    missing = [k for k in ("input", "output") if k not in s]
    for k in missing:
        r.problem(f"{path}.{k}", "required: USD per 1M tokens, e.g. 0.15")
    values = {k: r.value(s, k, path, Decimal, None, _non_negative) for k in PRICE_KEYS}
    if values["input"] is None or values["output"] is None:
        return None
    return Price(**values)


def _models(r: ConfigReader, entries: dict[str, Any], config: Config) -> dict[str, ModelRoute]:
    providers = config.providers
    out: dict[str, ModelRoute] = {}
    for alias, s in entries.items():
        p = f"models.{alias}"
        targets: list[Target] = []
        route = s.get("route")
        if not isinstance(route, list) or not route:
            r.problem(f"{p}.route", "required: a list of {provider, model, weight} targets")
            route = []
        for i, t in enumerate(route):
            tp = f"{p}.route[{i}]"
            ts = r.mapping(t, tp, ("provider", "model", "weight", "price", "rpm", "tpm"))
            provider = r.value(ts, "provider", tp, str, "")
            if not provider:
                r.problem(f"{tp}.provider", "required")
            elif provider not in providers:
                hint = difflib.get_close_matches(provider, list(providers), n=1)
                known = f"did you mean '{hint[0]}'?" if hint else f"known: {', '.join(providers) or 'none'}"
                r.problem(f"{tp}.provider", f"unknown provider '{provider}' ({known})")
            weight = r.value(ts, "weight", tp, int, 1, _positive)
            targets.append(Target(provider=provider, model=r.value(ts, "model", tp, str, str(alias)), weight=weight,
                                  price=_price(r, ts.get("price"), f"{tp}.price"),
                                  rpm=r.value(ts, "rpm", tp, int, None, _positive),
                                  tpm=r.value(ts, "tpm", tp, int, None, _positive)))
        # The model's cooldown keys override its providers' key by key (checked once, here).
        own = _cooldown(r, s.get("cooldown"), f"{p}.cooldown", CooldownSettings())
        given = {k: getattr(own, k) for k in _COOLDOWN_KEYS if isinstance(s.get("cooldown"), dict)
                 and s["cooldown"].get(k) is not None}
        targets = [replace(t, cooldown=replace(
            providers[t.provider].cooldown if t.provider in providers else CooldownSettings(), **given))
            for t in targets]
        fallbacks = r.value(s, "fallbacks", p, list, [])
        for i, fb in enumerate(fallbacks):
            if isinstance(fb, (dict, list)):
                r.problem(f"{p}.fallbacks[{i}]", f"expected a model name, got {_kind(fb)}")
            elif fb not in entries:
                r.problem(f"{p}.fallbacks[{i}]", f"unknown model '{fb}' (fallbacks name other models of this table)")
            elif fb == alias:
                r.problem(f"{p}.fallbacks[{i}]", "a model cannot fall back to itself")
        price = _price(r, s.get("price"), f"{p}.price")
        strategy = r.value(s, "strategy", p, str, "weighted")
        if strategy not in STRATEGIES:
            r.problem(f"{p}.strategy", f"unknown strategy '{strategy}' (one of: {', '.join(STRATEGIES)})")
        free = r.value(s, "free", p, bool, False)
        if free and price is not None:
            r.problem(f"{p}.free", "a model is either free or has a price, not both")
        if free:
            price = Price(input=Decimal(0), output=Decimal(0))
        out[str(alias)] = ModelRoute(
            alias=str(alias),
            targets=tuple(replace(t, price=t.price or price, alias=str(alias)) for t in targets),
            fallbacks=tuple(str(f) for f in fallbacks),
            timeouts=_timeouts(r, s.get("timeouts"), f"{p}.timeouts", config.upstream.timeouts),
            price=price,
            free=free,
            max_output_tokens=r.value(s, "max_output_tokens", p, int, None, _positive),
            strategy=strategy,
            retry=_retry(r, s.get("retry"), f"{p}.retry"),
        )
    _check_fallback_cycles(r, out)
    return {alias: replace(route, chain=_fallback_chain(out, alias)) for alias, route in out.items()}


def _fallback_chain(routes: Mapping[str, ModelRoute], alias: str) -> tuple[str, ...]:
    """``alias`` and every model its fallbacks reach, breadth-first, each once (unknown names skipped)."""
    chain = [alias]
    for name in chain:  # grows while it is walked: a queue
        chain += [f for f in routes[name].fallbacks if f in routes and f not in chain]
    return tuple(chain)


def _check_fallback_cycles(r: ConfigReader, routes: Mapping[str, ModelRoute]) -> None:
    """Report each fallback cycle once, at the first model of the table on it."""
    reported: set[frozenset[str]] = set()

    def walk(path: list[str]) -> None:
        for fb in routes[path[-1]].fallbacks:
            if fb == path[-1] or fb not in routes:
                continue  # falling back to itself and unknown names are reported where they are listed
            if fb in path:
                cycle = path[path.index(fb):] + [fb]
                members = frozenset(cycle)
                if members not in reported:
                    reported.add(members)
                    r.problem(f"models.{cycle[0]}.fallbacks", f"{' -> '.join(cycle)} is a cycle "
                              "(a model must not fall back to itself through other models)")
            else:
                walk(path + [fb])

    for alias in routes:
        walk([alias])


def _plugins(r: ConfigReader, s: dict[str, Any], config: Config) -> PluginsConfig:
    p = "plugins"
    return PluginsConfig(
        modules=tuple(str(m) for m in r.value(s, "modules", p, list, [])),
        directory=r.value(s, "directory", p, str, None),
        disable=tuple(str(m) for m in r.value(s, "disable", p, list, [])),
        entrypoints=r.value(s, "entrypoints", p, bool, True),
    )


SERVER_SECTION = ConfigSection("server", _server, (
    "host", "port", "workers", "grace_period", "max_body_bytes", "max_header_bytes", "access_log",
    "trusted_proxies", "cors", "header_timeout", "body_timeout", "keepalive_timeout", "max_connections",
    "max_connections_per_ip", "server_header", "gc_thresholds"),
    "The listening socket, worker processes, request size limits and connection hygiene.")
STORAGE_SECTION = ConfigSection("storage", _storage, ("url", "migrate_on_start"),
                                "The durable store: SQLite or PostgreSQL.")
STATE_SECTION = ConfigSection("state", _state, ("url",),
                              "The hot state shared by instances: memory:// or Redis.")
UPSTREAM_SECTION = ConfigSection("upstream", _upstream, ("timeouts", "max_response_bytes", "max_connections"),
                                 "Timeouts and limits of the calls to providers.")
PROVIDERS_SECTION = ConfigSection("providers", _providers, ("type", "base_url", "api_key", "headers", "options",
                                                          "cooldown", "max_concurrent"),
                                  "The upstream APIs, by a name of your choice.", entries=True)
MODELS_SECTION = ConfigSection("models", _models, (
    "route", "fallbacks", "timeouts", "price", "free", "max_output_tokens", "cooldown", "strategy", "retry"),
    "The routing table: the model names clients send, where they go and what they cost.", entries=True)
PLUGINS_SECTION = ConfigSection("plugins", _plugins, ("modules", "directory", "disable", "entrypoints"),
                                "Which plugins load besides the built-ins, and which built-ins are off.")

CORE_SECTIONS: tuple[ConfigSection[Any], ...] = (
    SERVER_SECTION, STORAGE_SECTION, STATE_SECTION, UPSTREAM_SECTION, PROVIDERS_SECTION, MODELS_SECTION,
    PLUGINS_SECTION)
"""In parsing order: models read the providers and the upstream timeouts."""
CORE_SECTION_NAMES = tuple(s.name for s in CORE_SECTIONS)


def parse_config(data: Any, source: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    """Validate a loaded YAML document's core sections; raise ConfigError listing every problem.

    The plugins' sections stay in ``unparsed`` until the plugins are known (``build_app``).
    When the core has problems, the sections of the plugins this config loads are checked
    too, so that the one error lists them all.
    """
    problems: list[str] = []
    r = ConfigReader(problems)
    if data is None:
        data = {}
    data = interpolate(data, os.environ if env is None else env, "", problems)
    top = r.mapping(data, "")
    config = Config(source=source)

    def section(declared: ConfigSection[T]) -> T:
        return declared.parse(r, declared.mapping(r, top.get(declared.name)), config)

    server = section(SERVER_SECTION)
    storage_url, migrate_on_start = section(STORAGE_SECTION)
    state_url = section(STATE_SECTION)
    config = replace(config, upstream=section(UPSTREAM_SECTION))
    config = replace(config, providers=section(PROVIDERS_SECTION))
    config = replace(
        config,
        server=server,
        storage_url=storage_url,
        storage_migrate_on_start=migrate_on_start,
        state_url=state_url,
        models=section(MODELS_SECTION),
        plugins=section(PLUGINS_SECTION),
        unparsed={str(k): v for k, v in top.items() if k not in CORE_SECTION_NAMES},
    )
    if problems:
        raise ConfigError(source, problems, partial=config)  # plugins.load_config adds the plugins' problems
    return config



DEFAULT_CONFIG_PATHS = ("nexgate.yaml", "config/nexgate.yaml")


def find_config(path: str | None) -> str | None:
    """The config file to use: the one given, else $NEXGATE_CONFIG, else the first default that exists."""
    if path:
        return path
    if os.environ.get("NEXGATE_CONFIG"):
        return os.environ["NEXGATE_CONFIG"]
    return next((p for p in DEFAULT_CONFIG_PATHS if os.path.exists(p)), None)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text (bad byte at offset {exc.start}); save the file as UTF-8"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError(source, [f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    return parse_config(data, source, env)


def demo_config() -> Config:
    """The built-in offline demo: an echo provider behind a few model aliases."""
    return load_config(Path(__file__).with_name("demo.yaml"))
