"""Run ``nexgate`` with the cyclic collector's passes timed: ``python gc_probe.py OUT.json serve ...``.

A ``gc.callbacks`` hook times every collection by generation. SIGUSR1 writes the counts and
pauses since the previous SIGUSR1 to OUT.json (then starts counting afresh), so a benchmark
can bracket one load phase. Used by ``jitter.py``; nothing here is part of the gateway.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from time import perf_counter

OUT = sys.argv.pop(1)
_started = [0.0]
_pauses: list[list[float]] = [[], [], []]
_collected = [0, 0, 0]


def _timed(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = perf_counter()
    else:
        generation = info["generation"]
        _pauses[generation].append(perf_counter() - _started[0])
        _collected[generation] += info["collected"]


def _dump(signum: int, frame: object) -> None:
    data = {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects()),
            "generations": [{"count": len(p), "total_ms": sum(p) * 1000, "max_ms": max(p, default=0) * 1000,
                             "p99_ms": sorted(p)[int(len(p) * 0.99)] * 1000 if p else 0,
                             "collected": _collected[g]} for g, p in enumerate(_pauses)]}
    with open(OUT, "w") as f:
        json.dump(data, f)
    for p in _pauses:
        p.clear()
    _collected[:] = [0, 0, 0]


if os.environ.get("NEXGATE_PROBE_SWITCH_INTERVAL"):  # an experiment: the GIL's hand-over interval, seconds
    sys.setswitchinterval(float(os.environ["NEXGATE_PROBE_SWITCH_INTERVAL"]))
gc.callbacks.append(_timed)
signal.signal(signal.SIGUSR1, _dump)

from nexgate_proxy.cli import main  # noqa: E402

sys.exit(main())
