"""The plugin lifecycle (paired units, unwound on a failed start), the typed per-request stash, and
metrics exported through the ``nexgate_metrics`` hook."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
from prometheus_client.core import CounterMetricFamily

from nexgate_plugins.redaction import PRIVACY
from nexgate_plugins.usage_log import OUTBOX
from nexgate_proxy import RequestContext, StashKey, hookimpl
from nexgate_proxy.app import build_app
from nexgate_proxy.background import stop_tasks
from nexgate_proxy.config import parse_config
from nexgate_proxy.plugins import PluginError
from nexgate_proxy.runner import GatewayRunner
from nexgate_proxy.server import serve_app
from nexgate_proxy.testing import FakeUpstream, free_port, gateway_config, require_redis
from tests.core.test_server import echo_config

ROOT = Path(__file__).resolve().parents[2]


def local_config(upstream: FakeUpstream, tmp_path: Path) -> Any:
    return parse_config({"storage": {"url": f"sqlite:///{tmp_path}/gw.db"},
                         "usage": {"outbox_dir": str(tmp_path / "outbox")}, **gateway_config(upstream)}, "test")


async def _tick_forever() -> None:
    while True:
        await asyncio.sleep(0.01)


# ------------------------------------------------------------ a failed start


class Ticker:
    __name__ = "ticker"

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.task: asyncio.Task[None] | None = None


class PairTicker(Ticker):
    """Starts a background task in ``nexgate_startup``, stops it in ``nexgate_shutdown`` (the paired form)."""

    @hookimpl
    async def nexgate_startup(self, app: Any) -> None:
        self.task = asyncio.create_task(_tick_forever())
        self.events.append("ticker started")

    @hookimpl
    async def nexgate_shutdown(self, app: Any) -> None:
        await stop_tasks(self.task)
        self.events.append("ticker stopped")


class LifespanTicker(Ticker):
    """The same, as one ``nexgate_lifespan`` unit."""

    @hookimpl
    async def nexgate_lifespan(self, app: Any) -> AsyncIterator[None]:
        self.task = asyncio.create_task(_tick_forever())
        self.events.append("ticker started")
        yield
        await stop_tasks(self.task)
        self.events.append("ticker stopped")


class BrokenInventory:
    """Starts a task of its own, then fails: its database is unreachable."""

    __name__ = "broken-inventory"

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.task: asyncio.Task[None] | None = None

    @hookimpl
    async def nexgate_lifespan(self, app: Any) -> AsyncIterator[None]:
        self.task = asyncio.create_task(_tick_forever())
        self.events.append("broken starting")
        raise RuntimeError("inventory database unreachable")
        yield
        self.events.append("broken stopped")  # never: its setup did not finish


@pytest.mark.parametrize("ticker_class", [PairTicker, LifespanTicker])
async def test_a_plugin_that_fails_to_start_stops_every_plugin_and_task_started_before_it(
        upstream: FakeUpstream, tmp_path: Path, ticker_class: type[Ticker]) -> None:
    events: list[str] = []
    ticker, broken = ticker_class(events), BrokenInventory(events)
    config = local_config(upstream, tmp_path)
    app = build_app(config, extra_plugins=[ticker, broken])
    tasks_before = asyncio.all_tasks()
    with pytest.raises(PluginError) as failure:
        await serve_app(app, config, "127.0.0.1", 0, reuse_port=False, stop=asyncio.Event())
    assert str(failure.value) == \
        "plugin 'broken-inventory' failed to start: RuntimeError: inventory database unreachable"
    assert events == ["ticker started", "broken starting", "ticker stopped"]
    assert ticker.task is not None and ticker.task.done()
    assert broken.task is not None and broken.task.cancelled()  # left by the failed setup, cancelled
    assert app[PRIVACY].task is None  # the built-ins started before it stopped too (the retention job)
    assert [t for t in asyncio.all_tasks() - tasks_before if not t.done()] == []


# ------------------------------------------------------------------- order


def _unit(name: str, events: list[str], **order: bool) -> object:
    class Unit:
        __name__ = name

        @hookimpl(**order)
        async def nexgate_lifespan(self, app: Any) -> AsyncIterator[None]:
            # The built-ins started first and stop last: the retention job and the outbox run throughout.
            assert app[PRIVACY].task is not None and not app[PRIVACY].task.done() and OUTBOX in app
            events.append(f"{name} start")
            yield
            assert not app[PRIVACY].task.done()
            events.append(f"{name} stop")
    return Unit()


class PairUnit:
    __name__ = "pair"

    def __init__(self, events: list[str]) -> None:
        self.events = events

    @hookimpl(tryfirst=True)
    async def nexgate_startup(self, app: Any) -> None:
        self.events.append("pair start")

    @hookimpl(trylast=True)
    async def nexgate_shutdown(self, app: Any) -> None:
        self.events.append("pair stop")


async def test_units_start_in_registration_order_and_stop_in_reverse_whatever_tryfirst_says(
        upstream: FakeUpstream, tmp_path: Path) -> None:
    events: list[str] = []
    plugins = [_unit("first", events, trylast=True), _unit("second", events, tryfirst=True),
               PairUnit(events), _unit("fourth", events)]
    app = build_app(local_config(upstream, tmp_path), extra_plugins=plugins)
    runner = GatewayRunner(app)
    await runner.setup()
    assert events == ["first start", "second start", "pair start", "fourth start"]
    await runner.cleanup()
    assert events[4:] == ["fourth stop", "pair stop", "second stop", "first stop"]
    assert app[PRIVACY].task is None


class NotAGenerator:
    @hookimpl
    async def nexgate_lifespan(self, app: Any) -> None:
        pass


def test_a_lifespan_that_is_not_an_async_generator_is_refused_when_the_app_is_built(
        upstream: FakeUpstream, tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="nexgate_lifespan must be an async generator function"):
        build_app(local_config(upstream, tmp_path), extra_plugins=[NotAGenerator()])


# ---------------------------------------------------------- nexgate serve

TICKER = """
    import asyncio
    import os
    from pathlib import Path
    from nexgate_proxy import hookimpl

    async def tick(path):
        while True:
            path.write_text("ticking")
            await asyncio.sleep(0.01)

    @hookimpl
    async def nexgate_lifespan(app, config):
        path = Path(__file__).with_name(f"ticker.{os.getpid()}.state")  # one per worker process
        task = asyncio.create_task(tick(path))
        await asyncio.sleep(0.05)
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        path.write_text("stopped")
"""

BROKEN = """
    import os
    from pathlib import Path
    from nexgate_proxy import hookimpl

    @hookimpl
    async def nexgate_startup(app, config):
        Path(__file__).with_name(f"broken.{os.getpid()}.state").write_text("reached")
        raise RuntimeError("inventory database unreachable")
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_nexgate_serve_exits_non_zero_naming_the_plugin_that_failed_to_start(tmp_path: Path, workers: int) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "a_ticker.py").write_text(textwrap.dedent(TICKER))  # loaded first: sorted by name
    (plugins / "b_broken.py").write_text(textwrap.dedent(BROKEN))
    state = require_redis() if workers > 1 else "memory://"
    config = echo_config(tmp_path, extra=f"plugins: {{directory: '{plugins}'}}", state=state)
    result = subprocess.run(
        [sys.executable, "-m", "nexgate_proxy.cli", "serve", "--config", str(config), "--port", str(free_port()),
         "--workers", str(workers)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    message = "plugin 'plugins/b_broken.py' failed to start: RuntimeError: inventory database unreachable"
    assert any(line.endswith(message) for line in result.stderr.splitlines()), output
    assert "Traceback" not in output
    assert "listening on" not in output
    # In every worker whose startup reached the broken plugin, the plugin started before it was stopped.
    # (With several workers the supervisor may end the others before their startup got that far.)
    failed = [path.name.split(".")[1] for path in plugins.glob("broken.*.state")]
    assert failed, output
    for pid in failed:
        assert (plugins / f"ticker.{pid}.state").read_text() == "stopped", pid
    if workers > 1:
        assert output.count("starting a new one") == 0  # a worker that cannot start is not restarted


# ------------------------------------------------------------------ metrics


class Widgets:
    __name__ = "widgets"

    def __init__(self) -> None:
        self.made = 0

    @hookimpl
    def nexgate_record(self, record: Any) -> None:
        self.made += 1

    @hookimpl
    def nexgate_metrics(self, app: Any) -> Any:
        yield CounterMetricFamily("acme_widgets_made", "Widgets made, one per request.", value=self.made)


class BrokenMetrics:
    __name__ = "broken-metrics"

    @hookimpl
    def nexgate_metrics(self, app: Any) -> Any:
        yield CounterMetricFamily("acme_half_done", "Never exported: the next line fails.", value=1)
        raise ValueError("counter gone")


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


async def test_a_third_party_plugin_exports_metrics_through_the_hook(
        upstream: FakeUpstream, start_gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    widgets = Widgets()
    gw = await start_gateway(gateway_config(upstream), plugins=[BrokenMetrics(), widgets])
    client = openai.AsyncOpenAI(base_url=gw.openai_base, api_key=gw.api_key, max_retries=0)
    for _ in range(2):
        await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    caplog.set_level(logging.ERROR)
    text = await scrape(gw.url)
    assert "acme_widgets_made_total 2.0" in text
    # The built-ins export theirs the same way: the request counts, the limiter, the redaction guard.
    assert 'nexgate_requests_total{endpoint="chat.completions",model="gpt-test",provider="fake",status="200",status_class="2xx"} 2.0' in text
    assert "nexgate_ratelimit_fallback_total 0.0" in text
    assert 'nexgate_redaction_dropped_total{sink="record"} 0.0' in text
    # A plugin that fails loses its own families for this scrape, nothing else.
    assert "acme_half_done" not in text
    assert any("broken-metrics" in r.getMessage() and "ValueError" in r.getMessage() for r in caplog.records)


class AsyncMetrics:
    @hookimpl
    async def nexgate_metrics(self, app: Any) -> Any:
        return []


def test_an_async_metrics_hook_is_refused_when_the_app_is_built(upstream: FakeUpstream, tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="nexgate_metrics must be a plain function"):
        build_app(local_config(upstream, tmp_path), extra_plugins=[AsyncMetrics()])


# ------------------------------------------------------------------- stash

SEEN: StashKey[str] = StashKey("test.seen")


class StashUser:
    def __init__(self) -> None:
        self.empty_at_admit: list[bool] = []
        self.settled: list[tuple[str, str | None]] = []

    @hookimpl
    async def nexgate_admit(self, ctx: RequestContext) -> None:
        self.empty_at_admit.append(SEEN not in ctx.stash)
        ctx.stash[SEEN] = ctx.request_id
        await asyncio.sleep(0.05)  # the other request's admit runs meanwhile

    @hookimpl
    def nexgate_settle(self, ctx: RequestContext) -> None:
        self.settled.append((ctx.request_id, ctx.stash.get(SEEN)))


async def test_the_stash_is_per_request(upstream: FakeUpstream, start_gateway: Any) -> None:
    plugin = StashUser()
    gw = await start_gateway(gateway_config(upstream), plugins=[plugin])
    client = openai.AsyncOpenAI(base_url=gw.openai_base, api_key=gw.api_key, max_retries=0)
    await asyncio.gather(*(client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]) for _ in range(2)))
    assert plugin.empty_at_admit == [True, True]
    assert len(plugin.settled) == 2 and all(rid == seen for rid, seen in plugin.settled)
    assert plugin.settled[0][0] != plugin.settled[1][0]


def test_the_stash_is_typed_for_mypy(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is in the test extras")
    snippet = tmp_path / "uses_stash.py"
    snippet.write_text(textwrap.dedent("""
        from nexgate_proxy import RequestContext, StashKey

        COUNT: StashKey[int] = StashKey("count")

        def use(ctx: RequestContext) -> None:
            reveal_type(ctx.stash[COUNT])
            reveal_type(ctx.stash.get(COUNT))
            reveal_type(ctx.stash.get(COUNT, "none"))
            ctx.stash[COUNT] = 1
            ctx.stash[COUNT] = "one"
    """))
    result = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
                             "--no-incremental", "--no-error-summary", str(snippet)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith(str(snippet))]
    assert lines[:3] == ['note: Revealed type is "int"', 'note: Revealed type is "int | None"',
                         'note: Revealed type is "int | str"'], result.stdout
    assert [line.split(":")[0] for line in lines[3:]] == ["error"], result.stdout  # only the str is refused
    assert f"{snippet}:11:" in result.stdout  # on the line that stores a str
