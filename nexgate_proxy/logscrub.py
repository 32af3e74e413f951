"""Log hygiene: no key, token or request data in a log line, at any level.

One process-wide :class:`ScrubFilter` is attached to every handler of the root
logger (and of any logger with handlers of its own, and ``logging.lastResort``)
by :func:`install`, which the CLI calls after configuring logging and the
redaction plugin calls while the app is built and when it starts. Installing
twice changes nothing. A filter on a *handler* sees every record that reaches
it, propagated ones included (aiohttp's ``aiohttp.access``, ``aiohttp.server``
and ``aiohttp.client`` loggers too), whatever the level: debug mode changes
nothing here.

What it enforces, on each record, in place (so every later handler and
formatter sees the clean record):

* **Secrets are masked** in the message, its arguments, extra attributes and
  exception text: NexGate keys (``ngk_<public id>_...``: the public prefix is
  kept, it is safe to log), provider keys (``sk-...``), ``Bearer`` tokens, JWTs
  (three base64url segments), ``api_key=``/``Authorization:``-style pairs,
  passwords in URLs, and every literal secret registered (the config's
  provider keys, ``Config.secrets()``).
* **Arguments that may hold request data are withheld**: only strings, numbers,
  booleans, None, dates, paths and flat lists/tuples/sets of those are
  formatted; a dict (a parsed body is one), bytes, or any other object (a
  request, a context) becomes ``<dict withheld>`` / ``<RequestContext>``.
* **Exception messages are withheld** in tracebacks, except for the types in
  :data:`SAFE_EXCEPTION_TYPES` (OS and network errors, timeouts, schema
  errors) whose messages NexGate or the OS compose without request data. A
  ``KeyError``, ``ValueError`` or ``JSONDecodeError`` can quote the body it
  failed on: its traceback keeps the frames (files, lines, code) and the type,
  not the message. The same rule applies to exceptions passed as arguments.
* Messages are cut at 8 KiB.

If scrubbing itself fails, the record is replaced by a fixed line saying so
(fail closed) and counted in :data:`STATS` ``["failed"]``.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import enum
import ipaddress
import logging
import re
import threading
import traceback
import uuid
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import PurePath
from typing import Any

REDACTED = "[REDACTED]"
MAX_MESSAGE_CHARS = 8192
MAX_EXCEPTION_MESSAGE_CHARS = 1000
MIN_SECRET_LENGTH = 6
"""Shorter literal secrets are not masked: they would mask ordinary words."""

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # A full NexGate key: keep its public prefix (safe to log), mask the secret and checksum.
    (re.compile(r"(?<![0-9A-Za-z])(ngk_[0-9A-Za-z]{12})_[0-9A-Za-z]+"), r"\1_" + REDACTED),
    # Anything longer than a prefix that starts like a key (a malformed or truncated key).
    (re.compile(r"(?<![0-9A-Za-z])ngk_[0-9A-Za-z]{13,}"), "ngk_" + REDACTED),
    # OpenAI/Anthropic-style provider keys: sk-..., sk-proj-..., sk-ant-...
    (re.compile(r"(?<![0-9A-Za-z])sk-[0-9A-Za-z_\-]{6,}"), "sk-" + REDACTED),
    (re.compile(r"(?i)\b(bearer)\s+(?!\[REDACTED)[^\s\"',;]+"), r"\1 " + REDACTED),
    # JWTs: a header that is base64url JSON ("eyJ...") and two more segments ...
    (re.compile(r"(?<![0-9A-Za-z_-])eyJ[0-9A-Za-z_-]*\.[0-9A-Za-z_-]+\.[0-9A-Za-z_-]*"), REDACTED),
    # ... or any three long base64url segments.
    (re.compile(r"(?<![0-9A-Za-z_.-])[0-9A-Za-z_-]{16,}\.[0-9A-Za-z_-]{16,}\.[0-9A-Za-z_-]{16,}"), REDACTED),
    # key=value and "Header: value" pairs that name a credential.
    (re.compile(r"(?i)\b((?:x-)?api[_-]?key|authorization|proxy-authorization|access_token|refresh_token|"
                r"id_token|token|client_secret|secret|password|passwd|admin_token)(\"?'?\s*[:=]\s*\"?'?)"
                r"(?!\s|\[REDACTED|bearer\b)[^\s\"',;&]+"), r"\1\2" + REDACTED),
    # user:password@ in URLs (postgresql://, redis://, https://).
    (re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@"), r"\1" + REDACTED + "@"),
)

_PLAIN_TYPES: tuple[type, ...] = (
    str, int, float, bool, type(None), Decimal, _dt.date, _dt.time, _dt.timedelta, PurePath, uuid.UUID,
    ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network, enum.Enum,
)
_MAX_CONTAINER_ITEMS = 100


def _safe_exception_types() -> tuple[type[BaseException], ...]:
    from .store.base import SchemaError

    # OSError covers ConnectionError, TimeoutError, FileNotFoundError and aiohttp's connector errors:
    # errno text, a host:port or a file name, never request data.
    return (OSError, asyncio.TimeoutError, asyncio.CancelledError, SchemaError)


SAFE_EXCEPTION_TYPES: tuple[type[BaseException], ...] = _safe_exception_types()
"""Exceptions whose messages may be logged (secrets still masked). Extend with :func:`allow_exception_messages`."""

STATS: dict[str, int] = {"scrubbed": 0, "withheld": 0, "failed": 0}
"""Process-wide counts: records in which a secret was masked, in which an argument or exception
message was withheld, and records the scrubber could not process (replaced by a fixed line)."""

_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName", "nexgate_scrubbed",
}
_LOCK = threading.Lock()
_FILTER: ScrubFilter | None = None


class _StandIn(str):
    """What replaces a withheld argument: prints the same with %s and %r."""

    def __repr__(self) -> str:
        return str(self)


def allow_exception_messages(*types: type[BaseException]) -> None:
    """Let these exception types' messages into logs (their text must never quote request data)."""
    global SAFE_EXCEPTION_TYPES
    SAFE_EXCEPTION_TYPES = tuple(dict.fromkeys((*SAFE_EXCEPTION_TYPES, *types)))


class ScrubFilter(logging.Filter):
    """Masks secrets and withholds request data in every record it sees; never drops one."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._literal: re.Pattern[str] | None = None

    # ------------------------------------------------------------ secrets

    def add_secrets(self, secrets: Iterable[str]) -> None:
        new = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LENGTH} - self._secrets
        if not new:
            return
        self._secrets |= new
        ordered = sorted(self._secrets, key=len, reverse=True)  # the longest first: no partial leftovers
        self._literal = re.compile("|".join(re.escape(s) for s in ordered))

    def scrub(self, text: str) -> str:
        """``text`` with every known kind of secret masked."""
        original = text
        if self._literal is not None:
            text = self._literal.sub(REDACTED, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        if text is not original and text != original:
            STATS["scrubbed"] += 1
        return text

    # ------------------------------------------------------------- record

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "nexgate_scrubbed", False):
            return True
        try:
            self._clean(record)
        except Exception as exc:  # fail closed: a fixed line instead of a record we could not vouch for
            STATS["failed"] += 1
            record.msg = f"log record withheld: the log scrubber failed on it ({type(exc).__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
            for name in [k for k in record.__dict__ if k not in _STANDARD_ATTRIBUTES]:
                delattr(record, name)
        record.nexgate_scrubbed = True
        return True

    def _clean(self, record: logging.LogRecord) -> None:
        withheld = [False]
        message = self._message(record, withheld)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + " ...[truncated]"
        record.msg = self.scrub(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.format_exception(record.exc_info[1], withheld)
        elif record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        record.exc_info = None
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        for name in [k for k in record.__dict__ if k not in _STANDARD_ATTRIBUTES]:
            setattr(record, name, self._extra(getattr(record, name), withheld))
        if withheld[0]:
            STATS["withheld"] += 1

    def _message(self, record: logging.LogRecord, withheld: list[bool]) -> str:
        msg = record.msg
        if not isinstance(msg, str):
            msg = self._arg_text(msg, withheld)
        args = record.args
        if not args:
            return msg
        if isinstance(args, Mapping):
            # logging turns a lone dict argument into mapping-style args: "%(name)s" formats use its
            # values, a plain "%s" prints the whole dict (a parsed body, maybe): withhold that.
            if "%(" in msg:
                safe: Any = {k: self._arg(v, withheld) for k, v in args.items()}
            else:
                safe = _StandIn(self._arg_text(dict(args), withheld))
        else:
            safe = tuple(self._arg(a, withheld) for a in (args if isinstance(args, tuple) else (args,)))
        try:
            return msg % safe
        except Exception:
            return f"{msg} [arguments withheld: they do not fit the message]"

    def _arg(self, value: Any, withheld: list[bool]) -> Any:
        """The value itself when it is plain, else a stand-in string."""
        if isinstance(value, _PLAIN_TYPES):
            return value
        return _StandIn(self._arg_text(value, withheld))

    def _arg_text(self, value: Any, withheld: list[bool]) -> str:
        if isinstance(value, _PLAIN_TYPES):
            return str(value)
        if isinstance(value, BaseException):
            if isinstance(value, SAFE_EXCEPTION_TYPES):
                return self._exception_message(value, withheld)
            withheld[0] = True
            return type(value).__name__
        if isinstance(value, (list, tuple, set, frozenset)) and len(value) <= _MAX_CONTAINER_ITEMS and all(
                isinstance(item, _PLAIN_TYPES) for item in value):
            return str(value if not isinstance(value, (set, frozenset)) else sorted(value, key=str))
        withheld[0] = True
        if isinstance(value, (bytes, bytearray, memoryview)):
            return f"<{len(value)} bytes withheld>"
        if isinstance(value, (dict, list, tuple, set, frozenset)):
            return f"<{type(value).__name__} withheld>"
        return f"<{type(value).__name__}>"

    def _extra(self, value: Any, withheld: list[bool], depth: int = 0) -> Any:
        """Extra attributes (``extra=`` of a log call, aiohttp's access log fields): strings masked."""
        if isinstance(value, str):
            return self.scrub(value[:MAX_MESSAGE_CHARS])
        if isinstance(value, (int, float, bool, type(None))):
            return value
        if isinstance(value, Mapping) and depth < 2 and len(value) <= _MAX_CONTAINER_ITEMS:
            return {str(k): self._extra(v, withheld, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and depth < 2 and len(value) <= _MAX_CONTAINER_ITEMS:
            return [self._extra(v, withheld, depth + 1) for v in value]
        return self.scrub(self._arg_text(value, withheld))

    # ---------------------------------------------------------- exceptions

    def _exception_message(self, exc: BaseException, withheld: list[bool]) -> str:
        if not isinstance(exc, SAFE_EXCEPTION_TYPES):
            try:
                empty = not str(exc)
            except Exception:
                empty = False
            if empty:
                return ""
            withheld[0] = True
            return "[message withheld: it may quote request data]"
        try:
            text = str(exc)
        except Exception:
            text = "[unprintable message]"
        if len(text) > MAX_EXCEPTION_MESSAGE_CHARS:
            text = text[:MAX_EXCEPTION_MESSAGE_CHARS] + " ...[truncated]"
        return self.scrub(text)

    def format_exception(self, exc: BaseException, withheld: list[bool] | None = None) -> str:
        """A traceback like Python's: frames (file, line, function, code) and types; messages as the policy says."""
        withheld = withheld if withheld is not None else [False]
        chain: list[tuple[BaseException, str | None]] = []
        seen: set[int] = set()
        current: BaseException | None = exc
        link: str | None = None
        while current is not None and id(current) not in seen and len(chain) < 16:
            seen.add(id(current))
            chain.append((current, link))
            if current.__cause__ is not None:
                current, link = current.__cause__, "\nThe above exception was the direct cause of the following exception:\n\n"
            elif current.__context__ is not None and not current.__suppress_context__:
                current, link = current.__context__, "\nDuring handling of the above exception, another exception occurred:\n\n"
            else:
                current = None
        parts: list[str] = []
        for index, (error, _) in enumerate(reversed(chain)):
            if index:
                # The link text belongs to the exception printed after it.
                parts.append(chain[len(chain) - index][1] or "")
            if error.__traceback__ is not None:
                parts.append("Traceback (most recent call last):\n")
                parts.extend(traceback.format_list(traceback.extract_tb(error.__traceback__)))
            name = type(error).__qualname__
            module = type(error).__module__
            if module not in ("builtins", "__main__"):
                name = f"{module}.{name}"
            message = self._exception_message(error, withheld)
            parts.append(f"{name}: {message}\n" if message else f"{name}\n")
            if isinstance(error, BaseExceptionGroup):
                parts.append(f"  ({len(error.exceptions)} sub-exceptions not shown)\n")
        return self.scrub("".join(parts).rstrip("\n"))


def get_filter() -> ScrubFilter:
    """The process-wide filter (created on first use, not installed)."""
    global _FILTER
    with _LOCK:
        if _FILTER is None:
            _FILTER = ScrubFilter()
        return _FILTER


def _handlers() -> list[logging.Handler]:
    handlers = list(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            handlers.extend(logger.handlers)
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    return handlers


def install(secrets: Iterable[str] = ()) -> ScrubFilter:
    """Attach the filter to every handler there is now; register more literal secrets. Idempotent."""
    scrub_filter = get_filter()
    scrub_filter.add_secrets(secrets)
    with _LOCK:
        for handler in _handlers():
            if scrub_filter not in handler.filters:
                handler.addFilter(scrub_filter)
    return scrub_filter


def installed_on(handler: logging.Handler) -> bool:
    return _FILTER is not None and _FILTER in handler.filters


def scrub(text: str) -> str:
    """Mask secrets in a string with the process-wide filter's knowledge."""
    return get_filter().scrub(text)
