"""A tiny auto-escaping template helper: every value is HTML-escaped unless it is already ``Safe``.

``html("<td>{name}</td>", name=user_text)`` escapes ``user_text``; pieces built with ``html`` are
``Safe`` and nest without double escaping. No template language, no dependency: pages are Python.
"""

from __future__ import annotations

import html as _html
import string
from typing import Any, Iterable


class Safe(str):
    """Markup that is already escaped (built by ``html`` or ``join``)."""

    __slots__ = ()


def escape(value: Any) -> Safe:
    if isinstance(value, Safe):
        return value
    return Safe(_html.escape("" if value is None else str(value), quote=True))


class _Formatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, Safe) and not format_spec:
            return value
        return escape(format(value, format_spec) if format_spec else value)


_FORMATTER = _Formatter()


def html(template: str, /, **values: Any) -> Safe:
    """``template`` is trusted markup (a literal in this package); every ``{field}`` is escaped."""
    return Safe(_FORMATTER.vformat(template, (), values))


def join(parts: Iterable[Any], separator: str = "") -> Safe:
    return Safe(separator.join(escape(p) for p in parts))
