"""Whether a plugin fits the hook specs, said with the fix: checked as each plugin registers.

pluggy refuses a misspelt hook or an unknown argument too, but its messages name neither the fix
nor, for a hook without ``@hookimpl``, anything at all (it ignores the function). A plugin may
also declare the hooks version it was written against (``NEXGATE_HOOKS``, semver-like).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import pluggy

from . import hookspecs

REQUIRES_HOOKS = "NEXGATE_HOOKS"
"""A plugin may set ``NEXGATE_HOOKS = "1.2"``: the hook-spec version it was written against (see hookspecs)."""


def check_version(required: str | None) -> list[str]:
    """Semver-like: a plugin written against 1.2 runs on 1.2 and later 1.x, not on 1.1 or 2.0."""
    if required is None:
        return []
    have = hookspecs.HOOKS_VERSION
    try:
        need_major, need_minor = (int(part) for part in required.split("."))
    except ValueError:
        return [f"{REQUIRES_HOOKS} = {required!r} is not a MAJOR.MINOR version such as '{have}'"]
    major, minor = (int(part) for part in have.split("."))
    if need_major != major or need_minor > minor:
        return [f"it needs hooks version {required} ({REQUIRES_HOOKS}), this NexGate has {have}: install a "
                f"release of the plugin made for hooks {major}.x, or a NexGate whose hooks are "
                f"{need_major}.{need_minor} or a later {need_major}.x"]
    return []


SPEC_NAMES = frozenset(name for name in dir(hookspecs) if name.startswith("nexgate_")
                        and callable(getattr(hookspecs, name)))


def check_hooks(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """What pluggy would refuse (or silently ignore), said with the fix."""
    problems = []
    for attr in dir(plugin):
        if not attr.startswith("nexgate_"):
            continue
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is None:
            if attr in SPEC_NAMES and callable(getattr(plugin, attr, None)):
                problems.append(f"{attr} is not marked with @hookimpl, so it would never be called: "
                                "decorate it with `@hookimpl` (from nexgate_proxy import hookimpl)")
            continue
        if attr not in SPEC_NAMES:
            close = difflib.get_close_matches(attr, SPEC_NAMES, n=1)
            hint = f"did you mean {close[0]}?" if close else "see the hook reference in docs/plugins.md"
            problems.append(f"{attr} is not a NexGate hook: {hint}")
            continue
        spec_args = list(inspect.signature(getattr(hookspecs, attr)).parameters)
        unknown = [name for name in required_args(getattr(plugin, attr)) if name not in spec_args]
        if unknown:
            problems.append(f"{attr} takes {', '.join(repr(a) for a in unknown)}, which the hook does not pass: "
                            f"it passes ({', '.join(spec_args)}); rename the argument or drop it "
                            "(accept any subset, by these names)")
    return problems


def required_args(fn: Any) -> list[str]:
    """The arguments pluggy would pass by name: those without a default (``self`` excluded)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
