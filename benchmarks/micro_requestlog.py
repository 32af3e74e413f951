#!/usr/bin/env python
"""CPU of the per-request log line (``logging.requests``), JSON and text, without HTTP.

The load benchmarks run NexGate at ``--log-level WARNING``, where the line is not written; this
measures what it adds at INFO: one usage record logged through a handler on /dev/null with the
log scrubber installed, fastest of 5 rounds of 20,000 (``time.process_time``).

    /work/venv/bin/python benchmarks/micro_requestlog.py
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime

from aiohttp import web

from nexgate_proxy import logscrub
from nexgate_proxy.logs import _ENABLED, TEXT_FORMAT, JsonFormatter, nexgate_record
from nexgate_proxy.records import UsageRecord

RECORD = UsageRecord("req_0123456789abcdef00000001", datetime.now(UTC), "chat.completions", "bench-model", "fake",
                     "bench-model", "usr_abc", None, "key_abc", "ngk_abcdefghijkl", 11, 7, 0, False, 1000, 900, 3,
                     200, None, False, None, 1)


def measure(formatter: logging.Formatter) -> float:
    handler = logging.StreamHandler(open(os.devnull, "w"))
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logscrub.install()
    app = web.Application()
    app[_ENABLED] = True
    for _ in range(2000):
        nexgate_record(RECORD, app)
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(20_000):
            nexgate_record(RECORD, app)
        best = min(best, (time.process_time() - started) / 20_000)
    root.removeHandler(handler)
    return best * 1e6


if __name__ == "__main__":
    print(f"json: {measure(JsonFormatter()):.1f} us CPU per request line")
    print(f"text: {measure(logging.Formatter(TEXT_FORMAT)):.1f} us CPU per request line")
