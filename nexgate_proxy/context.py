"""Per-request state and the typed records that hooks receive.

`RequestContext` lives in memory for one request and is never persisted: it
holds the parsed body, which is prompt content. What leaves the request is a
`UsageRecord` (nexgate_proxy.records), which by construction has metadata fields only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from .estimate import estimate_prompt_tokens, requested_output_cap
from .records import UsageRecord

if TYPE_CHECKING:
    from aiohttp import web
    from multidict import CIMultiDictProxy

    from .config import ModelRoute, Target


T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A key of ``RequestContext.stash`` whose values are a ``T``: ``HOLD: StashKey[Hold] = StashKey("credits.hold")``.

    Keys compare by identity, so two plugins never collide even with the same name; make one per
    kind of value, at module level (never per request).
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name
        """For ``repr`` only."""

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


if TYPE_CHECKING:
    class Stash(dict[StashKey[Any], Any]):
        """Per-request plugin data: ``ctx.stash[KEY]`` is typed by its ``StashKey[T]``."""

        def __getitem__(self, key: StashKey[T]) -> T: ...
        def __setitem__(self, key: StashKey[T], value: T) -> None: ...
        @overload  # type: ignore[override]
        def get(self, key: StashKey[T]) -> T | None: ...
        @overload
        def get(self, key: StashKey[T], default: D) -> T | D: ...
        def get(self, key: StashKey[T], default: object = None) -> object: ...
        @overload  # type: ignore[override]
        def pop(self, key: StashKey[T]) -> T: ...
        @overload
        def pop(self, key: StashKey[T], default: D) -> T | D: ...
        def pop(self, key: StashKey[T], default: object = None) -> object: ...
        def setdefault(self, key: StashKey[T], default: T) -> T: ...  # type: ignore[override]
else:
    # At run time the stash is a plain dict: a lookup costs exactly a dict lookup, no method in between.
    Stash = dict


@dataclass(slots=True)
class Identity:
    """Who is calling, as established by an `authenticate` hook."""

    account_id: str
    """The account that pays: a user id or an organization id."""
    key_id: str | None = None
    key_prefix: str | None = None
    """Short, non-secret prefix of the API key, safe to display and log."""
    user_id: str | None = None
    org_id: str | None = None
    allowed_models: frozenset[str] | None = None
    """None means every model."""
    limits: dict[str, Any] = field(default_factory=dict)
    """Per-key limit overrides (rpm, tpm, concurrent, allow, deny), read by the rate limit plugin."""
    org_limits: dict[str, Any] = field(default_factory=dict)
    """Per-org limit overrides from the store, read by the rate limit plugin."""
    suspended: bool = False
    """The key's user is suspended (restriction of processing): the auth plugin refuses it, 403."""


@dataclass(slots=True)
class Usage:
    """Token counts reported by the upstream (or counted, when it could not report)."""

    prompt_tokens: int = 0
    """Every input token, whatever its class (OpenAI's convention: cache reads and writes included)."""
    completion_tokens: int = 0
    """Every output token, audio included."""
    cached_tokens: int = 0
    """Of prompt_tokens: read from the provider's prompt cache."""
    cache_write_tokens: int = 0
    """Of prompt_tokens: written to the provider's prompt cache (Anthropic ``cache_creation_input_tokens``)."""
    cache_write_1h_tokens: int = 0
    """Of cache_write_tokens: written for an hour (Anthropic ``cache_creation.ephemeral_1h_input_tokens``)."""
    audio_input_tokens: int = 0
    """Of prompt_tokens: audio."""
    audio_output_tokens: int = 0
    """Of completion_tokens: audio."""
    reported: bool = False
    """True when the upstream reported the counts; False when they are estimates."""
    stream_events: int = 0
    """Content events relayed in a stream, the floor for an output estimate."""


@dataclass(slots=True)
class RequestContext:
    """One proxied request, from the first byte in to the last record out.

    Plugins keep their own per-request data in `stash`, under their own ``StashKey``.
    """

    request_id: str
    endpoint: str
    """The API operation, e.g. "chat.completions", "embeddings", "messages"."""
    api_format: str
    """"openai" or "anthropic": which error and stream dialect the client speaks."""
    request: web.Request
    app: web.Application
    """The gateway application (``request.app``, kept: plugins look up their per-app state on every request)."""
    client_ip: str
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    body: dict[str, Any] | None = None
    """The parsed request body. Prompt content: never persist, log or label with it."""
    body_size: int = 0
    model: str | None = None
    """The model alias the client asked for."""
    stream: bool = False
    identity: Identity | None = None
    route: ModelRoute | None = None
    targets: list[Target] = field(default_factory=list)
    target: Target | None = None
    """The target that answered (or was tried last)."""
    attempts: int = 0
    usage: Usage = field(default_factory=Usage)
    status: int = 0
    error_code: str | None = None
    client_disconnected: bool = False
    first_byte_at: float | None = None
    attempt_started: float = 0.0
    """perf_counter() when the upstream attempt under way was sent; 0 when none is (observability)."""
    upstream_wait: float = 0.0
    """Seconds spent waiting on upstreams (every attempt, a stream's chunks): the gateway's overhead is the rest."""
    first_chunk_at: float = 0.0
    """perf_counter() when a stream's first bytes came from the upstream (0: not a stream, or none came)."""
    estimated_cost_pico: int | None = None
    """The worst case the reserve phase held, in pico-USD (see nexgate_proxy.money)."""
    actual_cost_pico: int | None = None
    """What settle charged, in pico-USD."""
    finished: bool = False
    """settle/guard/record ran (they run once: before a success's last byte, else at the end)."""
    response_headers: dict[str, str] = field(default_factory=dict)
    """Headers hooks add to the client's response (e.g. rate limit headers)."""
    stash: Stash = field(default_factory=Stash)
    """Per-request plugin data: ``ctx.stash[KEY]`` with a module-level ``KEY: StashKey[T]`` (typed for mypy)."""
    _prompt_estimate: int | None = field(default=None, init=False, repr=False)
    _output_cap: int = field(default=-1, init=False, repr=False)

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.request.headers

    def prompt_estimate(self) -> int:
        """Worst-case prompt tokens of the body, computed once per request (credits and limits share it)."""
        if self._prompt_estimate is None:
            self._prompt_estimate = estimate_prompt_tokens(self.body or {}, self.body_size)
        return self._prompt_estimate

    def output_cap(self) -> int | None:
        """The output the client capped its request at, if it set a sane cap (computed once per request)."""
        if self._output_cap < 0:
            self._output_cap = requested_output_cap(self.body or {}) or 0
        return self._output_cap or None

    def latency_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)


_INT32_MAX = 2**31 - 1


def _count(value: int) -> int:
    # Token counts come from upstreams; an absurd one must not make the record unstorable.
    return value if 0 <= value <= _INT32_MAX else min(max(value, 0), _INT32_MAX)


_new_tuple = tuple.__new__


def usage_record(ctx: RequestContext) -> UsageRecord:
    """The metadata of a finished request (built positionally: this runs on every request).

    ``tuple.__new__`` with the values in field order is what ``UsageRecord(...)`` does, without
    the generated ``__new__``'s Python frame and its 22 arguments."""
    identity = ctx.identity
    target = ctx.target
    usage = ctx.usage
    return _new_tuple(UsageRecord, (
        ctx.request_id,
        datetime.fromtimestamp(ctx.started_at, UTC),
        ctx.endpoint,
        ctx.model if ctx.route is not None else None,
        target.provider if target else None,
        target.model if target else None,
        identity.account_id if identity else None,
        identity.org_id if identity else None,
        identity.key_id if identity else None,
        identity.key_prefix if identity else None,
        _count(usage.prompt_tokens),
        _count(usage.completion_tokens),
        _count(usage.cached_tokens),
        not usage.reported,
        ctx.estimated_cost_pico,
        ctx.actual_cost_pico,
        ctx.latency_ms(),
        ctx.status,
        ctx.error_code,
        ctx.stream,
        ctx.client_ip or None,
        ctx.attempts,
    ))
