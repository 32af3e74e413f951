"""The usage log: one metadata row per request, durable before the answer's last byte.

Rows go to a local outbox (``nexgate_proxy.outbox``) synchronously and on to
the store in batches, where each row also books its request's debit, once.
Optionally, rows older than ``usage.rollup_after_days`` are rolled up into the
daily totals the store keeps (``rollup.py``).
Failed authentications are not logged here (they have no account, and a flood
of them must not become a flood of rows); the rate limiter counts them.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nexgate_proxy import UsageRecord, hookimpl
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.background import stop_tasks
from nexgate_proxy.config import Config, ConfigReader, ConfigSection
from .outbox import Outbox
from .rollup import MAX_ROLLUP_DAYS, RollupState, refuse_late_rows, rollup_loop


@dataclass(frozen=True, slots=True)
class UsageSettings:
    outbox_dir: str = "./nexgate-outbox"
    flush_interval: float = 1.0
    batch_size: int = 500
    rollup_after_days: int = 0
    """Request rows older than this many days are rolled up into the daily totals; 0: kept (default)."""


def parse_usage_settings(r: ConfigReader, s: dict[str, Any], config: Config) -> UsageSettings:
    d = UsageSettings()
    default_dir = d.outbox_dir
    if config.storage_url.endswith(":memory:"):
        # Nothing durable to flush into: keep the spool out of the working directory too.
        default_dir = str(Path(tempfile.gettempdir()) / "nexgate-outbox-memory")
    return UsageSettings(
        outbox_dir=r.value(s, "outbox_dir", "usage", str, default_dir),
        flush_interval=r.value(s, "flush_interval", "usage", float, d.flush_interval,
                               lambda v: None if 0 < v <= 60 else "must be between 0 and 60 seconds"),
        batch_size=r.value(s, "batch_size", "usage", int, d.batch_size,
                           lambda v: None if 1 <= v <= 10_000 else "must be between 1 and 10000"),
        rollup_after_days=r.value(s, "rollup_after_days", "usage", int, d.rollup_after_days,
                                  lambda v: None if 0 <= v <= MAX_ROLLUP_DAYS
                                  else f"must be between 0 (off) and {MAX_ROLLUP_DAYS} days"),
    )


USAGE_SECTION = ConfigSection("usage", parse_usage_settings, ("outbox_dir", "flush_interval", "batch_size",
                                                                   "rollup_after_days"),
                              "The usage log's local outbox and how it flushes into the store.")
SETTINGS: web.AppKey[UsageSettings] = web.AppKey("nexgate_plugins.usage_log.settings", UsageSettings)
OUTBOX: web.AppKey[Outbox] = web.AppKey("nexgate_plugins.usage_log.outbox", Outbox)
ROLLUP: web.AppKey[RollupState] = web.AppKey("nexgate_plugins.usage_log.rollup", RollupState)


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [USAGE_SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    app[SETTINGS] = config.section(USAGE_SECTION)


@hookimpl
async def nexgate_lifespan(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    sink = app[STORE].record_usage
    state = None
    if settings.rollup_after_days:
        app[ROLLUP] = state = RollupState(settings.rollup_after_days)
        sink = refuse_late_rows(sink, state)
    outbox = Outbox(settings.outbox_dir, sink, batch_size=settings.batch_size,
                    flush_interval=settings.flush_interval)
    await outbox.start()
    app[OUTBOX] = outbox
    task = None
    if state is not None:
        task = asyncio.create_task(rollup_loop(app[STORE], state), name="nexgate-usage-rollup")
    yield
    await stop_tasks(task)
    await outbox.stop()


@hookimpl
def nexgate_metrics(app: web.Application) -> Iterator[Any]:
    outbox = app.get(OUTBOX)
    if outbox is None:
        return
    yield GaugeMetricFamily("nexgate_usage_outbox_pending", "Usage rows written locally, not yet in the store.",
                            value=outbox.pending)
    yield GaugeMetricFamily("nexgate_usage_outbox_lag_seconds",
                            "Seconds since the outbox was last flushed empty (0 while nothing waits).",
                            value=outbox.lag())
    yield CounterMetricFamily("nexgate_usage_outbox_flushed", "Usage rows flushed to the store.", value=outbox.flushed)
    yield CounterMetricFamily("nexgate_usage_outbox_flush_failures", "Flushes the store refused or did not answer.",
                              value=outbox.failures)
    rollup = app.get(ROLLUP)
    if rollup is not None:
        yield CounterMetricFamily("nexgate_usage_rollup_rows_deleted", "Request rows the usage roll-up deleted "
                                  "(their daily totals stay; this process).", value=rollup.rows_deleted)
        yield CounterMetricFamily("nexgate_usage_rollup_failures", "Failed usage roll-up runs (this process).",
                                  value=rollup.failures)
        yield CounterMetricFamily("nexgate_usage_rollup_rows_refused", "Outbox rows older than the roll-up "
                                  "window, dropped rather than risk charging them twice (this process).",
                                  value=rollup.rows_refused)


@hookimpl
def nexgate_record(record: UsageRecord, app: web.Application) -> None:
    if record.status == 401:
        return
    app[OUTBOX].append(record)
