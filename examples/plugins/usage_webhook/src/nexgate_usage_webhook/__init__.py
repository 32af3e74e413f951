"""Ship usage metadata to an HTTP endpoint (a webhook) in batches, off the request path.

``nexgate_record`` only appends the record to a bounded in-memory queue (a full
queue drops the record and counts it: the request never waits for the sink). A
background task started by ``nexgate_lifespan`` posts ``{"records": [...]}``
batches, retrying a failed post with exponential backoff and jitter; at
shutdown it stops taking new work, flushes what is queued within
``shutdown_timeout`` and closes its session.

Records are ``UsageRecord`` metadata (ids, model, tokens, costs, status,
latency): there is no content in them to send. The client IP, personal data,
is left out unless ``include_client_ip: true``.

    usage_webhook:
      url: https://billing.example.com/nexgate     # required
      headers: {Authorization: "Bearer ${WEBHOOK_TOKEN}"}
      batch_size: 100          # records per post; a full batch is sent at once
      flush_interval: 1.0      # seconds: a partial batch waits at most this long
      max_queue: 10000         # records waiting; beyond it new records are dropped (counted)
      max_retries: 5           # after the first attempt; then the batch is dropped (counted)
      backoff: 0.5             # seconds before the first retry, doubled each time (at most 30)
      timeout: 10.0            # seconds per post
      shutdown_timeout: 5.0    # seconds to flush at shutdown
      include_client_ip: false
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

import aiohttp
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nexgate_proxy import UsageRecord, hookimpl
from nexgate_proxy.background import stop_tasks
from nexgate_proxy.config import Config, ConfigReader, ConfigSection

NEXGATE_HOOKS = "1.0"
MAX_BACKOFF = 30.0

log = logging.getLogger("nexgate_usage_webhook")


@dataclass(frozen=True)
class Settings:
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    batch_size: int = 100
    flush_interval: float = 1.0
    max_queue: int = 10000
    max_retries: int = 5
    backoff: float = 0.5
    timeout: float = 10.0
    shutdown_timeout: float = 5.0
    include_client_ip: bool = False


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def parse(r: ConfigReader, section: dict[str, Any], config: Config) -> Settings | None:
    if not section:
        return None  # not configured: the plugin stays idle
    p = "usage_webhook"
    url = r.value(section, "url", p, str, "")
    if not url.startswith(("http://", "https://")):
        r.problem(f"{p}.url", "required: the webhook's http:// or https:// URL")
    headers = r.mapping(section.get("headers"), f"{p}.headers")
    d = Settings()
    return Settings(
        url=url,
        headers={str(k): str(v) for k, v in headers.items()},
        batch_size=r.value(section, "batch_size", p, int, d.batch_size, _positive),
        flush_interval=r.value(section, "flush_interval", p, float, d.flush_interval, _positive),
        max_queue=r.value(section, "max_queue", p, int, d.max_queue, _positive),
        max_retries=r.value(section, "max_retries", p, int, d.max_retries,
                            lambda v: None if v >= 0 else "must be 0 or more"),
        backoff=r.value(section, "backoff", p, float, d.backoff, _positive),
        timeout=r.value(section, "timeout", p, float, d.timeout, _positive),
        shutdown_timeout=r.value(section, "shutdown_timeout", p, float, d.shutdown_timeout, _positive),
        include_client_ip=r.value(section, "include_client_ip", p, bool, d.include_client_ip),
    )


SECTION = ConfigSection("usage_webhook", parse, tuple(Settings.__dataclass_fields__),
                        "Ship usage metadata to a webhook in batches.")


def payload(record: UsageRecord, include_client_ip: bool) -> dict[str, Any]:
    row = record._asdict()
    row["ts"] = record.ts.isoformat()
    if not include_client_ip:
        del row["client_ip"]
    return row


class Sink:
    """The queue, the sender and its counters; one per app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queue: deque[dict[str, Any]] = deque()
        self.wake = asyncio.Event()
        self.stopping = False
        self.sent = 0
        self.dropped = {"queue_full": 0, "undeliverable": 0, "shutdown": 0}
        self.retries = 0

    def add(self, record: UsageRecord) -> None:
        """On the request path: O(1), never waits."""
        if len(self.queue) >= self.settings.max_queue:
            self.dropped["queue_full"] += 1
            return
        self.queue.append(payload(record, self.settings.include_client_ip))
        if len(self.queue) >= self.settings.batch_size:
            self.wake.set()

    async def run(self, session: aiohttp.ClientSession) -> None:
        while not self.stopping:
            try:
                await asyncio.wait_for(self.wake.wait(), self.settings.flush_interval)
            except TimeoutError:
                pass
            self.wake.clear()
            while self.queue:
                batch = [self.queue.popleft() for _ in range(min(self.settings.batch_size, len(self.queue)))]
                try:
                    await self.deliver(session, batch)
                except Exception:  # a bug here must not stop the sender for good
                    self.dropped["undeliverable"] += len(batch)
                    log.exception("usage webhook: sending a batch failed")

    async def deliver(self, session: aiohttp.ClientSession, batch: list[dict[str, Any]]) -> None:
        s = self.settings
        delay = s.backoff
        status: int | str = "-"
        for attempt in range(s.max_retries + 1):
            try:
                async with session.post(s.url, json={"records": batch}, headers=s.headers,
                                        timeout=aiohttp.ClientTimeout(total=s.timeout)) as resp:
                    status = resp.status
                    if resp.status < 300:
                        self.sent += len(batch)
                        return
                    if 400 <= resp.status < 500 and resp.status not in (408, 429):
                        break  # the endpoint refuses this batch: retrying will not change its mind
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = type(exc).__name__
            if attempt < s.max_retries:
                self.retries += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: many gateways, one endpoint
                delay = min(delay * 2, MAX_BACKOFF)
        self.dropped["undeliverable"] += len(batch)
        log.warning("usage webhook: dropped a batch of %d records (last answer: %s)", len(batch), status)


SINK: web.AppKey[Sink] = web.AppKey("nexgate_usage_webhook.sink", Sink)


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    settings = config.section(SECTION)
    if settings is not None:
        app[SINK] = Sink(settings)


@hookimpl
async def nexgate_lifespan(app: web.Application) -> AsyncIterator[None]:
    sink = app.get(SINK)
    if sink is None:
        yield
        return
    session = aiohttp.ClientSession(trust_env=False)
    task = asyncio.create_task(sink.run(session), name="usage-webhook")
    yield
    # In-flight requests have finished: their records are queued. Send them, within the budget.
    sink.stopping = True
    sink.wake.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), sink.settings.shutdown_timeout)
    except TimeoutError:
        log.warning("usage webhook: %d records not sent at shutdown", len(sink.queue))
        sink.dropped["shutdown"] += len(sink.queue)
    await stop_tasks(task)
    await session.close()


@hookimpl
def nexgate_record(record: UsageRecord, app: web.Application) -> None:
    sink = app.get(SINK)
    if sink is not None:
        sink.add(record)


@hookimpl
def nexgate_metrics(app: web.Application) -> Iterator[Any]:
    sink = app.get(SINK)
    if sink is None:
        return
    records = CounterMetricFamily("nexgate_usage_webhook_records", "Usage records sent to or dropped "
                                  "before the webhook.", labels=("outcome",))
    records.add_metric(("sent",), sink.sent)
    for reason, count in sink.dropped.items():
        records.add_metric((f"dropped_{reason}",), count)
    yield records
    yield CounterMetricFamily("nexgate_usage_webhook_retries", "Webhook posts retried.", value=sink.retries)
    yield GaugeMetricFamily("nexgate_usage_webhook_queue", "Records waiting to be sent.", value=len(sink.queue))
