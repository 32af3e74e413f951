"""Run the gateway: one process, or N worker processes sharing the port.

Graceful shutdown on SIGTERM/SIGINT: stop accepting, let in-flight requests
and streams finish for up to ``server.grace_period`` seconds, then stop every
plugin in reverse start order (flushing what must be flushed). A plugin that
fails to start stops the process with a one-line error naming it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import shutil
import socket
import sys
import tempfile
import time
from typing import Sequence

from aiohttp import web

from .app import build_app
from .appkeys import CONFIG
from .config import Config
from .logs import LOGGING_SECTION, configure as configure_logging
from .plugins import PluginError
from .runner import GatewayRunner

log = logging.getLogger("nexgate.server")

STARTUP_FAILED = 3
"""A worker's exit code when a plugin failed to start: starting it again would fail again."""


def _event_loop_factory() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop has no Windows build; asyncio's loop still works
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve_app(app: web.Application, config: Config, host: str, port: int, *, reuse_port: bool,
                    stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then shut down gracefully."""
    runner = GatewayRunner(
        app,
        handle_signals=False,
        access_log=logging.getLogger("nexgate.access") if config.server.access_log else None,  # see logs.SafeAccessLogger
        shutdown_timeout=config.server.grace_period,
    )
    try:
        # A plugin that fails to start raises PluginError here; the cleanup below still closes what
        # the core opened before it (the plugins started before it are stopped by the chain).
        await runner.setup()
        _warn_if_open_files_too_few(config)
        settle_collector(config.server.gc_thresholds)
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=2048)
        try:
            await site.start()
        except OSError as exc:  # e.g. the port is in use: say so, without a traceback
            raise SystemExit(f"nexgate: cannot listen: {exc.strerror or exc}") from None
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        bound = [s.getsockname() for s in (site._server.sockets if site._server else [])]  # type: ignore[union-attr]
        log.info("NexGate %s listening on %s", os.getpid(),
                 ", ".join(f"http://{a[0]}:{a[1]}" for a in bound) or f"{host}:{port}")
        await stop.wait()
        log.info("NexGate %s shutting down (grace period %ss)", os.getpid(), config.server.grace_period)
    finally:
        await runner.cleanup()


def settle_collector(thresholds: tuple[int, int, int]) -> None:
    """The cyclic collector for a long-running gateway, once everything is built.

    Everything built so far (config, plugins, modules) lives as long as the process: frozen, it
    is out of every pass. Requests make next to no cyclic garbage (refcounting frees it), so the
    full passes, which scan every object the open requests and streams hold and pause the loop
    for tens of milliseconds in a burst, run rarely (``server.gc_thresholds``).
    """
    gc.set_threshold(*thresholds)
    gc.collect()
    gc.freeze()


def _warn_if_open_files_too_few(config: Config) -> None:
    """Past the open-file limit accept() fails for everyone; the connection caps are meant to come first."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = config.server.max_connections + config.upstream.max_connections + 64
    if soft != resource.RLIM_INFINITY and (config.server.max_connections == 0 or wanted > soft):
        log.warning("the open-file limit (%d) is below server.max_connections + upstream.max_connections; "
                    "raise it (ulimit -n) or lower them, or a connection flood fails every client", soft)


def run_worker(config: Config, host: str, port: int, reuse_port: bool,
               extra_plugins: Sequence[object] = ()) -> None:
    app = build_app(config, extra_plugins)
    with asyncio.Runner(loop_factory=_event_loop_factory) as runner:
        runner.run(serve_app(app, config, host, port, reuse_port=reuse_port))


def _run_forked_worker(config: Config, host: str, port: int) -> None:
    # A forked worker inherits the supervisor's handlers, which only set the supervisor's
    # flag: a SIGTERM before the worker's loop installs its own would be ignored.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run_worker(config, host, port, reuse_port=True)
    except PluginError as exc:
        log.error("worker %s: %s", os.getpid(), exc)
        sys.exit(STARTUP_FAILED)


def serve(config: Config, host: str, port: int, workers: int, extra_plugins: Sequence[object] = ()) -> int:
    """Blocking entry point of ``nexgate serve``. Returns the exit code."""
    app = build_app(config, extra_plugins)  # fail here, once, on a bad config or plugin: never half-start workers
    if LOGGING_SECTION.name in app[CONFIG].settings:
        configure_logging(app[CONFIG].section(LOGGING_SECTION))
    if workers <= 1:
        run_worker(config, host, port, reuse_port=False, extra_plugins=extra_plugins)
        return 0
    if config.state_url.startswith("memory://"):
        log.error("--workers > 1 needs shared state (state.url: redis://...): with memory:// each worker "
                  "would keep its own rate limits and credit holds")
        return 2
    if port == 0:
        log.error("--workers > 1 needs a fixed --port: each worker binds it with SO_REUSEPORT")
        return 2
    if not hasattr(socket, "SO_REUSEPORT"):
        log.error("--workers > 1 needs SO_REUSEPORT, which this platform lacks")
        return 2
    # The workers share their metrics through files here (nexgate_plugins.metrics.workers): any worker's
    # scrape shows the sum over all of them, a restarted one's counts included. Gone when the supervisor exits.
    shared = None
    if "NEXGATE_MULTIPROC_DIR" not in os.environ:
        shared = os.environ["NEXGATE_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="nexgate-workers-")
    try:
        return _supervise(config, host, port, workers)
    finally:
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)
            del os.environ["NEXGATE_MULTIPROC_DIR"]


def _supervise(config: Config, host: str, port: int, workers: int) -> int:
    """Start N workers on a shared port; restart one that dies; forward SIGTERM/SIGINT."""
    context = multiprocessing.get_context("fork")
    stopping = False

    def start() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_run_forked_worker, args=(config, host, port), daemon=False)
        process.start()
        return process

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs = [start() for _ in range(workers)]
    log.info("NexGate supervisor %s started %d workers on %s:%d", os.getpid(), workers, host, port)
    restarts: list[float] = []
    while not stopping:
        time.sleep(0.2)
        for i, proc in enumerate(procs):
            if proc.is_alive() or stopping:
                continue
            if proc.exitcode == STARTUP_FAILED:
                log.error("a worker failed to start (see above); stopping")
                stopping = True
                break
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > workers * 5:
                log.error("workers keep dying (%d restarts in a minute); giving up", len(restarts))
                stopping = True
                break
            log.error("worker %s exited with %s; starting a new one", proc.pid, proc.exitcode)
            procs[i] = start()
    for proc in procs:
        if proc.is_alive() and proc.pid:
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + config.server.grace_period + 10
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
    return 0 if all(p.exitcode in (0, -signal.SIGTERM) for p in procs) else 1
