"""``nexgate serve --workers 2``: any worker's scrape shows the sum, and it survives a worker's death."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from nexgate_proxy.testing import require_redis
from tests.core import test_server
from tests.core.test_server import Launch, chat_over_new_connection, echo_config, wait_for_workers

from .scrape import samples, total

_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def requests_counted(port: int) -> float:
    # A fresh connection per scrape: SO_REUSEPORT hands each to either worker.
    with _no_proxy.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return total(samples(response.read().decode()), "nexgate_requests_total", model="echo-chat", status="200")


def eventually(port: int, expected: float, scrapes: int = 8) -> list[float]:
    """Every one of ``scrapes`` scrapes, once the workers shared their counts (every 0.2 s here)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen = [requests_counted(port) for _ in range(scrapes)]
        if all(n == expected for n in seen):
            return seen
        time.sleep(0.1)
    pytest.fail(f"scrapes saw {seen}, not {expected} each")


launch = test_server.launch  # the fixture: `nexgate serve` processes, killed at the end


def test_every_scrape_sums_the_workers_and_a_dead_workers_counts_stay(launch: Launch, tmp_path: Path) -> None:
    extra = "metrics: {share_interval: 0.2}\n        logging: {format: json}"
    gateway = launch("--config", str(echo_config(tmp_path, state=require_redis(), extra=extra)), "--workers", "2")
    gateway.wait_healthy()
    workers = wait_for_workers(gateway, 2)
    connections = [chat_over_new_connection(gateway.port, f"request {i}") for i in range(12)]
    for conn, _ in connections:
        conn.close()
    eventually(gateway.port, 12)

    # A worker killed outright: its last shared counts still add up, its replacement adds its own.
    os.kill(min(workers), signal.SIGKILL)
    wait_for_workers(gateway, 1, exclude=workers)
    for i in range(3):
        chat_over_new_connection(gateway.port, f"after {i}")[0].close()
    eventually(gateway.port, 15)
    assert gateway.terminate(timeout=10) == 0

    # logging.format json: every line the workers wrote is a JSON object; each request has one.
    lines = [json.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
    assert len([line for line in lines if line["logger"] == "nexgate.request"]) == 15
    assert all(not line.startswith("Traceback") for line in gateway.log().splitlines())
