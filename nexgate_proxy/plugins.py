"""Plugin discovery with pluggy, and the async hook chain compiled from it.

pluggy registers and orders implementations; it cannot await them. So at
startup each phase is compiled into a tuple of plain callables in pluggy's call
order, and the request path awaits those directly: no ``pm.hook`` lookup and no
hook machinery allocated per request.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pluggy

from . import RecordRejected, hookspecs
from .context import RequestContext, usage_record
from .errors import GatewayError

if TYPE_CHECKING:
    from .config import Config, Target

log = logging.getLogger("nexgate.plugins")

DEFAULT_PLUGINS: tuple[str, ...] = (
    "nexgate_proxy.providers.openai",
    "nexgate_proxy.providers.anthropic",
    "nexgate_proxy.providers.azure",
    "nexgate_proxy.providers.gemini",
    "nexgate_proxy.providers.echo",
    "nexgate_plugins.auth",
    "nexgate_plugins.ratelimit",
    "nexgate_plugins.routing",
    "nexgate_plugins.credits",
    "nexgate_plugins.payments",
    "nexgate_plugins.usage_log",
    "nexgate_plugins.metrics",
    "nexgate_plugins.redaction",
    "nexgate_plugins.admin",
)
"""Built-in plugins, registered like any other. ``plugins.disable`` in the config removes one."""

ON_DISABLED = "nexgate_on_disabled"
"""A built-in module may define ``nexgate_on_disabled(config)``: called when ``plugins.disable`` names it,
to refuse (raise ConfigError) or warn."""

ENTRYPOINT_GROUP = "nexgate"
ENTRYPOINTS_ENV = "NEXGATE_LOAD_PLUGINS"
"""Set to 0 to skip installed entry-point plugins (e.g. to debug a broken one)."""


class PluginError(Exception):
    """A plugin could not be loaded or does not fit the hook specs."""


def build_plugin_manager(config: Config, extra_plugins: Sequence[object] = ()) -> pluggy.PluginManager:
    """Built-ins, entry points, the config's modules and directory, then ``extra_plugins`` (embedding, tests)."""
    pm = pluggy.PluginManager("nexgate")
    pm.add_hookspecs(hookspecs)
    disabled = set(config.plugins.disable)
    for name in DEFAULT_PLUGINS:
        module = importlib.import_module(name)
        if name.rsplit(".", 1)[-1] not in disabled and name not in disabled:
            _register(pm, module, name)
        elif hasattr(module, ON_DISABLED):
            # A disabled plugin registers no hooks, so it gets this one say: refuse (e.g. the privacy guard).
            getattr(module, ON_DISABLED)(config)
    if config.plugins.entrypoints and os.environ.get(ENTRYPOINTS_ENV, "1") != "0":
        try:
            pm.load_setuptools_entrypoints(ENTRYPOINT_GROUP)
        except Exception as exc:  # a broken third-party package must name itself
            raise PluginError(f"loading entry-point plugins of group '{ENTRYPOINT_GROUP}' failed: {exc!r}") from exc
    for name in config.plugins.modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise PluginError(f"plugins.modules: cannot import '{name}': {exc}") from exc
        _register(pm, module, name)
    if config.plugins.directory:
        for module, name in _load_directory(Path(config.plugins.directory)):
            _register(pm, module, name)
    for plugin in extra_plugins:
        _register(pm, plugin, getattr(plugin, "__name__", None) or f"{type(plugin).__name__}@{id(plugin):x}")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc} (is the hook name misspelt? known hooks are in nexgate_proxy/hookspecs.py)") from exc
    return pm


def _register(pm: pluggy.PluginManager, module: Any, name: str) -> None:
    if pm.has_plugin(name):
        return
    try:
        pm.register(module, name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{name}': {exc}") from exc


def _load_directory(directory: Path) -> list[tuple[Any, str]]:
    if not directory.is_dir():
        raise PluginError(f"plugins.directory: '{directory}' is not a directory")
    loaded = []
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        name = f"nexgate_dir_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"plugins.directory: cannot load '{path}'")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise PluginError(f"plugins.directory: '{path}' failed to import: {exc!r}") from exc
        loaded.append((module, f"{directory.name}/{path.name}"))
    return loaded


# ------------------------------------------------------------- the chain

class _Impl:
    """One implementation, ready to call with the hook's arguments in the spec's order."""

    __slots__ = ("call", "is_async", "plugin", "name")

    def __init__(self, call: Callable[..., Any], is_async: bool, plugin: str, name: str) -> None:
        self.call = call
        self.name = name
        self.is_async = is_async
        """Decided at startup; a plain function may still return an awaitable (checked when not None)."""
        self.plugin = plugin


def _positional(fn: Callable[..., Any], argnames: tuple[str, ...], spec: tuple[str, ...]) -> Callable[..., Any]:
    """``fn`` taking the spec's arguments positionally: itself when it takes them all in order."""
    if argnames == spec:
        return fn
    picks = tuple(spec.index(name) for name in argnames)
    return lambda *args: fn(*[args[i] for i in picks])


def _compile(pm: pluggy.PluginManager, hook_name: str) -> tuple[_Impl, ...]:
    caller = getattr(pm.hook, hook_name)
    spec = tuple(caller.spec.argnames) if caller.spec is not None else ()
    impls: list[_Impl] = []
    # pluggy calls the last of get_hookimpls() first (tryfirst/trylast already sorted).
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            raise PluginError(
                f"plugin '{impl.plugin_name}': {hook_name} is a wrapper; NexGate runs hooks "
                "as coroutines, which wrappers cannot wrap. Use tryfirst/trylast instead."
            )
        impls.append(_Impl(_positional(impl.function, tuple(impl.argnames), spec),
                           inspect.iscoroutinefunction(impl.function), impl.plugin_name,
                           getattr(impl.function, "__name__", hook_name)))
    return tuple(impls)


_isawaitable = inspect.isawaitable


async def _call(impl: _Impl, *args: Any) -> Any:
    result = impl.call(*args)
    if impl.is_async or (result is not None and _isawaitable(result)):
        result = await result
    return result


class HookChain:
    """The compiled hook phases. The only way the core calls plugins.

    The request phases inline what ``_call`` does: they run several times per request,
    and a coroutine per implementation call is measurable there.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._authenticate = _compile(pm, "nexgate_authenticate")
        self._admit = _compile(pm, "nexgate_admit")
        self._route = _compile(pm, "nexgate_route")
        self._reserve = _compile(pm, "nexgate_reserve")
        self._settle = _compile(pm, "nexgate_settle")
        self._guard_record = _compile(pm, "nexgate_guard_record")
        self._record = _compile(pm, "nexgate_record")
        self._startup = _compile(pm, "nexgate_startup")
        self._shutdown = _compile(pm, "nexgate_shutdown")
        self._ready = _compile(pm, "nexgate_ready")
        self.records_dropped = 0
        self.hook_failures = 0

    # -- request phases; these raise GatewayError to reject

    async def authenticate(self, ctx: RequestContext) -> None:
        for impl in self._authenticate:
            identity = impl.call(ctx)
            if impl.is_async or (identity is not None and _isawaitable(identity)):
                identity = await identity
            if identity is not None:
                ctx.identity = identity
                return

    async def admit(self, ctx: RequestContext) -> None:
        for impl in self._admit:
            result = impl.call(ctx)
            if impl.is_async or (result is not None and _isawaitable(result)):
                await result

    async def route(self, ctx: RequestContext) -> list[Target]:
        for impl in self._route:
            targets = impl.call(ctx)
            if impl.is_async or (targets is not None and _isawaitable(targets)):
                targets = await targets
            if targets is not None:
                return targets
        raise GatewayError(404, f"The model `{ctx.model}` does not exist.", code="model_not_found", param="model")

    async def reserve(self, ctx: RequestContext) -> None:
        for impl in self._reserve:
            result = impl.call(ctx)
            if impl.is_async or (result is not None and _isawaitable(result)):
                await result

    # -- final phases; these always run and never raise

    async def finish(self, ctx: RequestContext) -> None:
        """settle, then guard and record the metadata. Never raises."""
        # Each implementation inline (no coroutine per call): this runs for every request.
        for impl in self._settle:
            try:
                result = impl.call(ctx)
                if impl.is_async or (result is not None and _isawaitable(result)):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(impl, exc)
        record = usage_record(ctx)
        app = ctx.app
        for impl in self._guard_record:
            try:
                result = impl.call(record, app)
                if impl.is_async or (result is not None and _isawaitable(result)):
                    await result
            except RecordRejected:
                self.records_dropped += 1
                log.error("usage record %s dropped by guard '%s'", ctx.request_id, impl.plugin)
                return
            except Exception:
                # A guard that fails cannot vouch for the record: fail closed.
                self.records_dropped += 1
                self.hook_failures += 1
                log.error("guard '%s' failed on record %s; record dropped", impl.plugin, ctx.request_id)
                return
        for impl in self._record:
            try:
                result = impl.call(record, app)
                if impl.is_async or (result is not None and _isawaitable(result)):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(impl, exc)

    def _failed(self, impl: _Impl, exc: Exception) -> None:
        self.hook_failures += 1
        # The exception type and plugin only: messages may quote request data.
        log.error("hook %s of plugin '%s' failed: %s", impl.name, impl.plugin, type(exc).__name__)

    # -- lifecycle

    async def startup(self, app: Any, config: Config) -> None:
        # Registration order: built-ins (stores, state) come up before the plugins using them.
        for impl in reversed(self._startup):
            await _call(impl, app, config)

    async def shutdown(self, app: Any) -> None:
        # pluggy's order, the reverse of registration: users of a resource stop before it.
        for impl in self._shutdown:
            try:
                await _call(impl, app)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(impl, exc)

    async def ready(self, app: Any) -> list[tuple[str, bool]]:
        checks = []
        for impl in self._ready:
            try:
                result = await asyncio.wait_for(_call(impl, app), timeout=1.0)
            except Exception:
                result = (impl.plugin, False)
            if result is not None:
                checks.append(result)
        return checks

    def provider_types(self) -> dict[str, type]:
        types: dict[str, type] = {}
        for impl in _compile(self.pm, "nexgate_register_providers"):
            result = impl.call() or {}
            for name, cls in result.items():
                if name in types and types[name] is not cls:
                    raise PluginError(f"provider type '{name}' is registered twice (by '{impl.plugin}' and another plugin)")
                types[name] = cls
        return types

    def check_config(self, config: Config) -> list[str]:
        problems: list[str] = []
        for impl in _compile(self.pm, "nexgate_check_config"):
            problems += impl.call(config) or []
        return problems

    def cli_commands(self, subparsers: Any) -> None:
        for impl in _compile(self.pm, "nexgate_cli_commands"):
            impl.call(subparsers)

    def register_routes(self, app: Any, config: Config) -> None:
        for impl in _compile(self.pm, "nexgate_register_routes"):
            impl.call(app, config)
