"""Plugin discovery with pluggy, and the async hook chain compiled from it.

pluggy registers and orders implementations; it cannot await them. So at
startup each phase is compiled into a tuple of plain callables in pluggy's call
order, and the request path awaits those directly: no ``pm.hook`` lookup and no
hook machinery allocated per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import GeneratorType, MappingProxyType
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Sequence

import pluggy

from . import RecordRejected, hookspecs, logscrub
from .background import stop_tasks
from . import config as config_module
from .config import CORE_SECTION_NAMES, Config, ConfigError, ConfigReader, ConfigSection
from .context import RequestContext, usage_record
from .errors import GatewayError
from .plugincheck import REQUIRES_HOOKS, SPEC_NAMES, check_hooks, check_version

if TYPE_CHECKING:
    from .config import Target

log = logging.getLogger("nexgate.plugins")

DEFAULT_PLUGINS: tuple[str, ...] = (
    "nexgate_proxy.providers.openai",
    "nexgate_proxy.providers.anthropic",
    "nexgate_proxy.providers.azure",
    "nexgate_proxy.providers.gemini",
    "nexgate_proxy.providers.echo",
    "nexgate_proxy.logs",
    "nexgate_plugins.auth",
    "nexgate_plugins.ratelimit",
    "nexgate_plugins.routing",
    "nexgate_plugins.credits",
    "nexgate_plugins.payments",
    "nexgate_plugins.usage_log",
    "nexgate_plugins.metrics",
    "nexgate_plugins.tracing",
    "nexgate_plugins.redaction",
    "nexgate_plugins.admin",
    "nexgate_plugins.admin.dashboard",
)
"""Built-in plugins, registered like any other. ``plugins.disable`` in the config removes one."""

ON_DISABLED = "nexgate_on_disabled"
"""A built-in module may define ``nexgate_on_disabled(config)``: called with the parsed config when
``plugins.disable`` names it, to refuse (raise ConfigError, whose problems join the others) or warn."""

ENTRYPOINT_GROUP = "nexgate"
ENTRYPOINTS_ENV = "NEXGATE_LOAD_PLUGINS"
"""Set to 0 to skip installed entry-point plugins (e.g. to debug a broken one)."""


class PluginError(Exception):
    """A plugin could not be loaded or does not fit the hook specs."""


# Its messages name plugins and hooks, from load and start time: never request data.
logscrub.allow_exception_messages(PluginError)


@dataclass(frozen=True)
class PluginInfo:
    """Where a registered plugin came from, for ``nexgate plugins list`` and for messages."""

    name: str
    source: str
    """"built-in", "entry point", "module", "directory" or "code" (passed in by the embedding program)."""
    origin: str
    """The module, the distribution and entry point, or the file."""
    requires_hooks: str | None = None


class PluginManager(pluggy.PluginManager):
    """pluggy's manager that also remembers where each plugin came from and which built-ins are off."""

    def __init__(self) -> None:
        super().__init__("nexgate")
        self.infos: dict[str, PluginInfo] = {}
        self.disabled: tuple[str, ...] = ()
        self.entrypoints_loaded = False


def build_plugin_manager(config: Config, extra_plugins: Sequence[object] = ()) -> PluginManager:
    """Built-ins, entry points, the config's modules and directory, then ``extra_plugins`` (embedding, tests)."""
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    pm.disabled = tuple(disabled_builtins(config))
    for name in DEFAULT_PLUGINS:
        if name not in pm.disabled:
            _register(pm, importlib.import_module(name), PluginInfo(name, "built-in", name))
    if config.plugins.entrypoints and os.environ.get(ENTRYPOINTS_ENV, "1") != "0":
        pm.entrypoints_loaded = True
        for plugin, info in _load_entrypoints():
            _register(pm, plugin, info)
    for name in config.plugins.modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise PluginError(f"plugins.modules: cannot import '{name}': {exc}") from exc
        _register(pm, module, PluginInfo(name, "module", getattr(module, "__file__", None) or name))
    if config.plugins.directory:
        for module, name in _load_directory(Path(config.plugins.directory)):
            _register(pm, module, PluginInfo(name, "directory", str(module.__file__)))
    for plugin in extra_plugins:
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}@{id(plugin):x}"
        _register(pm, plugin, PluginInfo(name, "code", getattr(plugin, "__name__", None) or type(plugin).__qualname__))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # check_hooks found these first; kept as a safety net
        raise PluginError(f"{exc} (is the hook name misspelt? known hooks are in nexgate_proxy/hookspecs.py)") from exc
    return pm


def _load_entrypoints() -> list[tuple[Any, PluginInfo]]:
    """The installed ``nexgate`` entry points, each named by its distribution when it fails to load."""
    found: list[tuple[Any, PluginInfo]] = []
    seen: set[str] = set()
    for ep in importlib.metadata.entry_points(group=ENTRYPOINT_GROUP):
        if ep.name in seen:  # one distribution on the path twice
            continue
        seen.add(ep.name)
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}: {ep.value}" if dist is not None else ep.value
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party package must name itself
            raise PluginError(f"entry point '{ep.name}' ({origin}) of group '{ENTRYPOINT_GROUP}' failed to "
                              f"load: {exc!r}; fix or uninstall it, or set {ENTRYPOINTS_ENV}=0 to skip entry "
                              "points") from exc
        found.append((plugin, PluginInfo(ep.name, "entry point", origin)))
    return found


def disabled_builtins(config: Config) -> list[str]:
    """The built-ins ``plugins.disable`` names (by short or full name)."""
    disabled = set(config.plugins.disable)
    return [name for name in DEFAULT_PLUGINS if name in disabled or name.rsplit(".", 1)[-1] in disabled]


def _register(pm: PluginManager, plugin: Any, info: PluginInfo) -> None:
    if pm.has_plugin(info.name) or pm.is_registered(plugin):
        return  # the same plugin reached twice (an entry point also listed in plugins.modules)
    required = getattr(plugin, REQUIRES_HOOKS, None)
    info = replace(info, requires_hooks=None if required is None else str(required))
    problems = check_version(info.requires_hooks) + check_hooks(pm, plugin)
    if problems:
        where = info.origin if info.origin != info.name else info.source
        raise PluginError(f"plugin '{info.name}' ({where}): " + "; ".join(problems))
    try:
        pm.register(plugin, info.name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{info.name}': {exc}") from exc
    pm.infos[info.name] = info


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


def plugins_report(pm: PluginManager) -> dict[str, Any]:
    """What ``nexgate plugins list`` shows: every plugin in registration order, its hooks, what is off."""
    plugins = []
    for order, (name, plugin) in enumerate(pm.list_name_plugin(), 1):
        info = pm.infos.get(name) or PluginInfo(name, "code", name)
        hooks = sorted(caller.name for caller in (pm.get_hookcallers(plugin) or ()))
        plugins.append({"order": order, "name": name, "source": info.source, "origin": info.origin,
                        "hooks": hooks, "requires_hooks": info.requires_hooks})
    call_order = {}
    for hook in sorted(SPEC_NAMES):
        impls = getattr(pm.hook, hook).get_hookimpls()
        if impls:
            call_order[hook] = [impl.plugin_name for impl in reversed(impls)]  # pluggy calls the last first
    return {"hooks_version": hookspecs.HOOKS_VERSION, "plugins": plugins,
            "disabled": list(pm.disabled), "entrypoints_loaded": pm.entrypoints_loaded, "call_order": call_order}


# ------------------------------------------------------ config sections


def configure(config: Config, pm: pluggy.PluginManager, problems: list[str]) -> Config:
    """``config`` with every section the plugins declare parsed, once; problems are added to ``problems``.

    Checks that every top-level key is a section someone declared. A disabled built-in's
    sections are parsed and checked too (a typo there is still a typo), then its
    ``nexgate_on_disabled`` hook has its say.
    """
    declared: dict[str, tuple[str, ConfigSection[Any]]] = {}

    def declare(owner: str, sections: Any) -> None:
        for section in sections or ():
            if section.name in CORE_SECTION_NAMES:
                raise PluginError(f"plugin '{owner}' declares the config section '{section.name}', which is the core's")
            if section.name in declared and declared[section.name][1] is not section:
                raise PluginError(f"config section '{section.name}' is declared twice "
                                  f"(by '{declared[section.name][0]}' and '{owner}')")
            declared[section.name] = (owner, section)

    # Registration order (pluggy calls the last registered first), so problems read top-down.
    for impl in reversed(_compile(pm, "nexgate_config_sections")):
        declare(impl.plugin, impl.call())
    disabled = [importlib.import_module(name) for name in disabled_builtins(config)]
    for module in disabled:
        if hasattr(module, "nexgate_config_sections"):
            declare(module.__name__, module.nexgate_config_sections())

    r = ConfigReader(problems)
    r.mapping(dict(config.unparsed), "", (*CORE_SECTION_NAMES, *declared))  # unknown top-level keys
    settings: dict[str, Any] = {}
    for name, (owner, section) in declared.items():
        try:
            settings[name] = section.parse(r, section.mapping(r, config.unparsed.get(name)), config)
        except Exception as exc:  # a parser's bug must name its plugin, not look like a config problem
            raise PluginError(f"plugin '{owner}': parsing the config section '{name}' failed: {exc!r}") from exc
    config = replace(config, settings=MappingProxyType(settings))  # frozen like the rest of Config
    for module in disabled:
        if hasattr(module, ON_DISABLED):
            # A disabled plugin registers no hooks, so it gets this one say: refuse (e.g. the privacy guard).
            try:
                getattr(module, ON_DISABLED)(config)
            except ConfigError as exc:
                problems += exc.problems
    return config


def resolve_config(config: Config, extra_plugins: Sequence[object] = ()) -> Config:
    """``config`` with its plugins' sections parsed, for code that needs them without an app (the CLI)."""
    problems: list[str] = []
    config = configure(config, build_plugin_manager(config, extra_plugins), problems)
    if problems:
        raise ConfigError(config.source, problems)
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """``config.load_config`` with every problem in one pass: when the core's sections have problems,
    the sections of the plugins the file loads are checked too (the core cannot: it knows no plugins)."""
    try:
        return config_module.load_config(path)
    except ConfigError as exc:
        if exc.partial is None:
            raise
        raise ConfigError(exc.source, exc.problems + section_problems(exc.partial)) from None


def section_problems(config: Config) -> list[str]:
    """The problems of the sections of the plugins ``config`` loads (for a config that fails anyway)."""
    problems: list[str] = []
    try:
        configure(config, build_plugin_manager(config), problems)
    except PluginError as exc:
        problems.append(str(exc))  # e.g. "plugins.modules: cannot import 'x': ..."
    return problems


# ------------------------------------------------------------- the chain

class _Impl:
    """One implementation, ready to call with the hook's arguments in the spec's order."""

    __slots__ = ("call", "is_async", "plugin", "hook")

    def __init__(self, call: Callable[..., Any], is_async: bool, plugin: str, hook: str) -> None:
        self.call = call
        self.hook = hook
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
                           inspect.iscoroutinefunction(impl.function), impl.plugin_name, hook_name))
    return tuple(impls)


Lifespan = Callable[[Any, "Config"], AsyncIterator[None]]
"""One plugin's unit of the lifecycle: ``(app, config)`` -> an async generator that yields once."""


def _lifespans(pm: pluggy.PluginManager) -> tuple[tuple[str, Lifespan], ...]:
    """Each plugin's lifecycle units, in registration order whatever tryfirst/trylast say.

    A plugin's ``nexgate_lifespan`` is its unit; its ``nexgate_startup`` and
    ``nexgate_shutdown`` make one more, paired.
    """
    by_plugin: dict[str, dict[str, _Impl]] = {}
    for hook_name in ("nexgate_lifespan", "nexgate_startup", "nexgate_shutdown"):
        for impl in _compile(pm, hook_name):
            by_plugin.setdefault(impl.plugin, {})[hook_name] = impl
    for hook_impl in pm.hook.nexgate_lifespan.get_hookimpls():
        if not inspect.isasyncgenfunction(hook_impl.function):
            raise PluginError(f"plugin '{hook_impl.plugin_name}': nexgate_lifespan must be an async generator "
                              "function (async def with one yield: setup, yield, teardown)")
    units: list[tuple[str, Lifespan]] = []
    for name, _ in pm.list_name_plugin():  # registration order
        impls = by_plugin.get(name, {})
        if "nexgate_lifespan" in impls:
            units.append((name, impls["nexgate_lifespan"].call))
        if "nexgate_startup" in impls or "nexgate_shutdown" in impls:
            units.append((name, _paired(impls.get("nexgate_startup"), impls.get("nexgate_shutdown"))))
    return tuple(units)


def _paired(startup: _Impl | None, shutdown: _Impl | None) -> Lifespan:
    async def unit(app: Any, config: Config) -> AsyncIterator[None]:
        if startup is not None:
            await _call(startup, app, config)
        yield
        if shutdown is not None:
            await _call(shutdown, app)
    return unit


_plain_results: set[type] = {list, tuple, dict, str, int, bool}
"""Types a plain hook returned that are not awaitable. ``inspect.isawaitable`` ends in an ABC
check for anything but a coroutine (an Identity, a list of targets): once per type is enough."""


def _isawaitable(result: Any) -> bool:
    kind = type(result)
    if kind in _plain_results:
        return False
    if inspect.isawaitable(result):
        return True
    # A generator's awaitability is per object (types.coroutine): never remembered. Bounded: hooks
    # return few types.
    if kind is not GeneratorType and len(_plain_results) < 256:
        _plain_results.add(kind)
    return False


async def _call(impl: _Impl, *args: Any) -> Any:
    result = impl.call(*args)
    if impl.is_async or (result is not None and _isawaitable(result)):
        result = await result
    return result


TRACEBACK_EVERY = 60.0
"""Seconds between two logged tracebacks of one plugin's hook (every failure is still logged and counted)."""


def _describe(exc: BaseException) -> str:
    """One line for the operator: the exception's type and message, secrets masked."""
    text = str(exc).strip().splitlines()
    return logscrub.scrub(f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__)


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
        # Bound once: calling a partial makes the phase's coroutine directly, no wrapper coroutine per request.
        self.admit: Callable[[RequestContext], Awaitable[None]] = functools.partial(self._every, self._admit)
        self.reserve: Callable[[RequestContext], Awaitable[None]] = functools.partial(self._every, self._reserve)
        self._settle = _compile(pm, "nexgate_settle")
        self._guard_record = _compile(pm, "nexgate_guard_record")
        self._record = _compile(pm, "nexgate_record")
        self._lifespans = _lifespans(pm)
        self._ready = _compile(pm, "nexgate_ready")
        self._metrics = _compile(pm, "nexgate_metrics")
        self._upstream_attempt = _compile(pm, "nexgate_upstream_attempt")
        self._upstream_done = _compile(pm, "nexgate_upstream_done")
        for impl in (*self._metrics, *self._upstream_attempt, *self._upstream_done):
            if impl.is_async:
                raise PluginError(f"plugin '{impl.plugin}': {impl.hook} must be a plain function "
                                  "(it runs where nothing is awaited)")
        self.records_dropped = 0
        self.failures: dict[tuple[str, str], int] = {}
        """(plugin, hook) -> failures in this process, exported as ``nexgate_plugin_failures_total``."""
        self._last_traceback: dict[tuple[str, str], float] = {}

    _REQUEST_HOOKS = {"nexgate_authenticate": "_authenticate", "nexgate_admit": "_admit", "nexgate_route": "_route",
                      "nexgate_reserve": "_reserve", "nexgate_settle": "_settle", "nexgate_record": "_record",
                      "nexgate_upstream_attempt": "_upstream_attempt", "nexgate_upstream_done": "_upstream_done"}

    def unplug(self, plugin: str, *hooks: str) -> None:
        """Take ``plugin``'s implementations of these per-request hooks out of the chain.

        For a plugin that finds at startup that it has nothing to do on requests (tracing without
        an endpoint): its hooks then cost nothing, not even a call per request.
        """
        for hook in hooks:
            name = self._REQUEST_HOOKS[hook]
            setattr(self, name, tuple(impl for impl in getattr(self, name) if impl.plugin != plugin))
        for phase, impls in (("admit", self._admit), ("reserve", self._reserve)):
            current = getattr(self, phase)
            if isinstance(current, functools.partial) and current.func == self._every:  # not wrapped (tracing)
                setattr(self, phase, functools.partial(self._every, impls))

    @property
    def attempt_hooks(self) -> bool:
        """Some plugin implements ``nexgate_upstream_attempt`` (else the proxy skips the call)."""
        return bool(self._upstream_attempt)

    # -- request phases; these raise GatewayError to reject

    # A plugin's bug (anything but GatewayError) becomes a 500 naming the plugin: `_request_failed`.
    # The try blocks cost nothing until something raises.

    async def authenticate(self, ctx: RequestContext) -> None:
        for impl in self._authenticate:
            try:
                identity = impl.call(ctx)
                if impl.is_async or (identity is not None and _isawaitable(identity)):
                    identity = await identity
            except GatewayError:
                raise
            except Exception as exc:
                raise self._request_failed(impl, exc, ctx) from exc
            if identity is not None:
                ctx.identity = identity
                return

    async def _every(self, impls: tuple[_Impl, ...], ctx: RequestContext) -> None:
        """admit and reserve: every implementation, unless one raises."""
        for impl in impls:
            try:
                result = impl.call(ctx)
                if impl.is_async or (result is not None and _isawaitable(result)):
                    await result
            except GatewayError:
                raise
            except Exception as exc:
                raise self._request_failed(impl, exc, ctx) from exc

    async def route(self, ctx: RequestContext) -> list[Target]:
        for impl in self._route:
            try:
                targets = impl.call(ctx)
                if impl.is_async or (targets is not None and _isawaitable(targets)):
                    targets = await targets
            except GatewayError:
                raise
            except Exception as exc:
                raise self._request_failed(impl, exc, ctx) from exc
            if targets is not None:
                return targets
        raise GatewayError(404, f"The model `{ctx.model}` does not exist.", code="model_not_found", param="model")


    def _request_failed(self, impl: _Impl, exc: Exception, ctx: RequestContext) -> GatewayError:
        self._failed(impl, exc, ctx.request_id)
        return GatewayError(500, f"The gateway's plugin '{impl.plugin}' failed in {impl.hook}; the request was "
                            "not sent upstream. The gateway's log has the details.",
                            code="plugin_error", type="server_error")

    # -- upstream attempts; plain functions, never raise

    def upstream_attempt(self, ctx: RequestContext, target: Target, headers: dict[str, str]) -> None:
        for impl in self._upstream_attempt:
            try:
                impl.call(ctx, target, headers)
            except Exception as exc:
                self._failed(impl, exc)

    def upstream_done(self, ctx: RequestContext, target: Target, status: int, error_code: str | None) -> None:
        for impl in self._upstream_done:
            try:
                impl.call(ctx, target, status, error_code)
            except Exception as exc:
                self._failed(impl, exc)

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
                self._failed(impl, exc, ctx.request_id)
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
            except Exception as exc:
                # A guard that fails cannot vouch for the record: fail closed.
                self.records_dropped += 1
                self._failed(impl, exc, ctx.request_id, "; record dropped")
                return
        for impl in self._record:
            try:
                result = impl.call(record, app)
                if impl.is_async or (result is not None and _isawaitable(result)):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(impl, exc, ctx.request_id)

    def _failed(self, impl: _Impl, exc: Exception, request_id: str | None = None, outcome: str = "") -> None:
        """Count a failure (``nexgate_plugin_failures_total``) and log it; the traceback at most once a minute
        per plugin and hook, so a sink that fails on every request does not flood the log. The log scrubber
        keeps the frames and withholds the exception's message, which may quote request data."""
        key = (impl.plugin, impl.hook)
        self.failures[key] = self.failures.get(key, 0) + 1
        now = time.monotonic()
        with_traceback = now - self._last_traceback.get(key, -TRACEBACK_EVERY) >= TRACEBACK_EVERY
        if with_traceback:
            self._last_traceback[key] = now
        log.error("hook %s of plugin '%s' failed%s: %s%s", impl.hook, impl.plugin,
                  f" on request {request_id}" if request_id else "", type(exc).__name__, outcome,
                  exc_info=exc if with_traceback else None)

    @property
    def hook_failures(self) -> int:
        return sum(self.failures.values())

    # -- lifecycle

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any, config: Config) -> AsyncIterator[None]:
        """Every plugin's lifecycle unit: started in registration order, stopped in reverse.

        A unit that fails to start stops the ones already started, and the tasks it left behind,
        then raises ``PluginError`` naming the plugin.
        """
        started: list[tuple[str, AsyncIterator[None]]] = []
        for plugin, open_unit in self._lifespans:
            tasks_before = asyncio.all_tasks()
            unit = open_unit(app, config)
            try:
                await unit.__anext__()
            except BaseException as exc:
                await self._stop(started)
                # What the failed setup started before it raised has no teardown that would stop it.
                await stop_tasks(*(asyncio.all_tasks() - tasks_before))
                if isinstance(exc, StopAsyncIteration):
                    raise PluginError(f"plugin '{plugin}': nexgate_lifespan ended without yielding") from None
                if isinstance(exc, Exception):
                    raise PluginError(f"plugin '{plugin}' failed to start: {_describe(exc)}") from exc
                raise
            started.append((plugin, unit))
        try:
            yield
        finally:
            await self._stop(started)

    async def _stop(self, started: list[tuple[str, AsyncIterator[None]]]) -> None:
        # The reverse of starting: the users of a resource stop before it.
        while started:
            plugin, unit = started.pop()
            try:
                await unit.__anext__()
            except StopAsyncIteration:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._count(plugin, "nexgate_lifespan")
                log.error("plugin '%s' failed to stop: %s", plugin, _describe(exc))
                continue
            self._count(plugin, "nexgate_lifespan")
            log.error("plugin '%s': nexgate_lifespan yielded more than once", plugin)
            await unit.aclose()  # type: ignore[attr-defined]

    def _count(self, plugin: str, hook: str) -> None:
        self.failures[(plugin, hook)] = self.failures.get((plugin, hook), 0) + 1

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

    def metrics(self, app: Any) -> list[Any]:
        """Every plugin's ``nexgate_metrics`` families, for one scrape; a failing plugin only loses its own."""
        families: list[Any] = []
        for impl in self._metrics:
            try:
                families += list(impl.call(app) or ())  # all of a plugin's families, or none
            except Exception as exc:
                self._failed(impl, exc)
        return [*families, self._failure_family()]

    def _failure_family(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("nexgate_plugin_failures", "Exceptions raised by plugin hooks (this process); "
                                     "a request phase's answers the client 500 plugin_error, the others are "
                                     "logged and skipped.", labels=("plugin", "hook"))
        for (plugin, hook), count in sorted(self.failures.items()):
            family.add_metric((plugin, hook), count)
        return family

    def provider_types(self) -> dict[str, type]:
        types: dict[str, type] = {}
        for impl in _compile(self.pm, "nexgate_register_providers"):
            result = impl.call() or {}
            for name, cls in result.items():
                if name in types and types[name] is not cls:
                    raise PluginError(f"provider type '{name}' is registered twice (by '{impl.plugin}' and another plugin)")
                types[name] = cls
        return types

    def cli_commands(self, subparsers: Any) -> None:
        for impl in _compile(self.pm, "nexgate_cli_commands"):
            impl.call(subparsers)

    def register_routes(self, app: Any, config: Config) -> None:
        for impl in _compile(self.pm, "nexgate_register_routes"):
            impl.call(app, config)
