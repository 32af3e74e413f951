"""One scrape of any worker shows the sum over every worker of ``nexgate serve --workers N``.

Each worker keeps its counts in memory (see families.py) and writes a snapshot
of all its families (every plugin's, through ``nexgate_metrics``) to its own
file in a directory the workers share, every ``metrics.share_interval``
seconds, at each scrape and when it stops. A scrape answers with its own
families, fresh, plus every other worker's last snapshot, sample by sample:

* counters and histograms add up, and a dead worker's last snapshot keeps
  counting, so totals never go down when a worker is restarted (its
  replacement starts a file of its own);
* gauges add up over live workers only (a dead worker's requests are not in
  flight), except ``*_state``/``*_open``/``*_up`` gauges, where the maximum
  (the worst worker) is the honest answer.

Why not prometheus_client's multiprocess mode: it writes an mmap'd value, under a
lock, on every increment (a dozen per request), and cannot aggregate the custom
collectors plugins export through ``nexgate_metrics``.

A dead worker's file stays (its counts keep adding up) until the supervisor exits and removes
the directory: one file per worker ever started, a few KiB each.

The directory: ``metrics.multiprocess_dir`` when set, else ``$NEXGATE_MULTIPROC_DIR``,
which the supervisor of ``--workers N`` creates for its workers (and removes at
exit). A snapshot holds sample names, label values and numbers: nothing more
than the scrape shows.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterable

from prometheus_client.metrics_core import Metric

MAX_GAUGE_SUFFIXES = ("_state", "_open", "_up")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _encode(families: Iterable[Metric]) -> list[Any]:
    return [[f.name, f.type, f.documentation, [[s.name, s.labels, s.value] for s in f.samples]]
            for f in families]


class SharedMetrics:
    """This worker's snapshot file, and the merge of everyone's."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pid = os.getpid()
        # A token as well as the pid: a new worker that gets a dead one's pid must not overwrite its file.
        self.path = self.directory / f"worker-{self.pid}-{secrets.token_hex(4)}.json"

    def write(self, families: Iterable[Metric]) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(_encode(families)))
        os.replace(temporary, self.path)  # a reader never sees half a file

    def merged(self, own: list[Metric]) -> list[Metric]:
        """``own`` (this worker's fresh families) plus every other worker's last snapshot."""
        self.write(own)
        families: dict[str, Metric] = {}
        values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        order: list[tuple[str, str, tuple[tuple[str, str], ...]]] = []
        for path in sorted(self.directory.glob("worker-*.json")):
            try:
                pid = int(path.name.split("-")[1])
                data = json.loads(path.read_text())
            except (OSError, ValueError, IndexError):
                continue  # a file being replaced, or not ours
            alive = pid == self.pid or _alive(pid)
            for name, kind, documentation, samples in data:
                family = families.get(name)
                if family is None:
                    family = families[name] = Metric(name, documentation, kind)
                if kind == "gauge" and not alive:
                    continue
                take_max = kind == "gauge" and name.endswith(MAX_GAUGE_SUFFIXES)
                for sample_name, labels, value in samples:
                    key = (name, sample_name, tuple(sorted(labels.items())))
                    if key not in values:
                        values[key] = value
                        order.append(key)
                    elif take_max:
                        values[key] = max(values[key], value)
                    else:
                        values[key] += value
        for key in order:
            name, sample_name, labels = key
            families[name].add_sample(sample_name, dict(labels), values[key])
        return list(families.values())


def shared_directory(configured: str) -> str | None:
    return configured or os.environ.get("NEXGATE_MULTIPROC_DIR") or None
