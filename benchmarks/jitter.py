#!/usr/bin/env python
"""Latency jitter at one connection, and the collector's pauses behind it.

Starts the fake upstream (core 1, with wrk) and one NexGate per configuration (core 0, full
chain as ``run.py`` configures it) under ``gc_probe.py``, which times every collection by
generation. Rounds alternate: the upstream direct, then each NexGate, ``--duration`` seconds
of wrk at ``--connections`` each. Prints p50/p99 per round, the time the server waited for its
core (run queue, from /proc: other processes on a shared machine, the usual cause of a
milliseconds p99 here) and the collections per 10,000 requests with their total, p99 and
longest pause.

    .venv/bin/python benchmarks/jitter.py                              # the config as is
    .venv/bin/python benchmarks/jitter.py --config "old gc=server.gc_freeze=false"
    .venv/bin/python benchmarks/jitter.py --rev bc6a63c --mode stream

``--config LABEL=KEY=VALUE[;KEY=VALUE]`` adds a NexGate whose config has those dotted keys
set (values are YAML). Stores: as run.py (NEXGATE_BENCH_STORAGE_URL / _STATE_URL).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    SPINNER, Server, cores_available, free_port, request_body, run_wrk, use_source,
)

HERE = Path(__file__).resolve().parent


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for key in path:
        config = config.setdefault(key, {})
    config[last] = value


def _run_queue_wait(pid: int) -> float:
    """Seconds this process's threads were runnable but waiting for a CPU (/proc/PID/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def _gc_stats(server: Server, out: Path) -> dict[str, Any]:
    out.unlink(missing_ok=True)
    os.kill(server.pid, signal.SIGUSR1)
    for _ in range(100):
        if out.exists() and out.stat().st_size:
            time.sleep(0.05)
            return json.loads(out.read_text())
        time.sleep(0.05)
    raise RuntimeError(f"{server.name}: no GC stats written")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("json", "stream"), default="json")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--config", action="append", default=[], metavar="LABEL=KEY=VALUE[;KEY=VALUE]")
    parser.add_argument("--no-base", action="store_true", help="only the --config NexGates")
    parser.add_argument("--rev", help="NexGate as committed at this revision")
    parser.add_argument("--no-spin", action="store_true")
    args = parser.parse_args()
    print(f"NexGate source: {use_source(args.rev)}")
    from gateway_config import gateway_setup, write_gateway_config

    cores = cores_available()
    sut, load = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    tmp = Path(tempfile.mkdtemp(prefix="nexgate-jitter-"))
    body_file = tmp / "body.json"
    body_file.write_bytes(request_body(args.mode == "stream"))
    configs: list[tuple[str, dict[str, Any]]] = [] if args.no_base else [("NexGate", {})]
    for text in args.config:
        label, _, sets = text.partition("=")
        changes: dict[str, Any] = {}
        for item in sets.split(";"):
            key, _, value = item.partition("=")
            changes[key.strip()] = yaml.safe_load(value)  # "env.NAME=value": an environment variable
        configs.append((label.strip(), changes))
    servers: list[Server] = []
    try:
        spinners = []
        if not args.no_spin and sut is not None:
            for core in (sut, load):
                spinner = Server(f"spinner {core}", [sys.executable, "-c", SPINNER, "3600"], 0, core, tmp / f"spin{core}.log")
                spinner.start()
                spinners.append(spinner)
        up_port = free_port()
        upstream = Server("fake upstream", [sys.executable, str(HERE / "fake_upstream.py"), "--port", str(up_port)],
                          up_port, load, tmp / "upstream.log")
        upstream.start()
        servers.append(upstream)
        upstream.wait_ready("/health")
        gateways: list[tuple[str, Server, Path, dict[str, str]]] = []
        for index, (label, changes) in enumerate(configs):
            workdir = tmp / f"gw{index}"
            workdir.mkdir()
            port = free_port()
            setup = gateway_setup(upstream.url, port, workdir)
            for key, value in changes.items():
                if key.startswith("env."):
                    setup.env[key[4:]] = str(value)
                else:
                    _set(setup.config, key, value)
            config = write_gateway_config(setup, workdir / "nexgate.yaml")
            out = workdir / "gc.json"
            gateway = Server(label, [sys.executable, str(HERE / "gc_probe.py"), str(out), "--log-level", "WARNING",
                                     "serve", "--config", str(config)], port, sut, workdir / "nexgate.log",
                             env=setup.env, cwd=workdir)
            gateway.start()
            servers.append(gateway)
            gateway.wait_ready("/healthz", timeout=60)
            run_wrk(port, args.connections, args.warmup, body_file, setup.headers, load)
            gateways.append((label, gateway, out, setup.headers))
        run_wrk(up_port, args.connections, args.warmup, body_file, {}, load)
        rows: dict[str, list[dict[str, Any]]] = {"upstream direct": []}
        for round_no in range(args.rounds):
            order = [("upstream direct", None, None, {})] + [(lb, g, o, h) for lb, g, o, h in gateways]
            if round_no % 2:
                order.reverse()
            for label, gateway, out, headers in order:
                port = up_port if gateway is None else gateway.port
                pid = upstream.pid if gateway is None else gateway.pid
                if gateway is not None:
                    _gc_stats(gateway, out)  # reset
                waited = _run_queue_wait(pid)
                result = run_wrk(port, args.connections, args.duration, body_file, headers, load)
                waited = _run_queue_wait(pid) - waited
                row = {"requests": result["requests"], "p50_ms": result["latency_us"]["p50"] / 1000,
                       "p99_ms": result["latency_us"]["p99"] / 1000, "max_ms": result["latency_us"]["max"] / 1000,
                       "errors": sum(result["errors"].values()),
                       # Other processes on the server's core: time it was ready to run and could not.
                       "run_queue_ms_per_s": waited * 1000 / args.duration}
                if gateway is not None:
                    row["gc"] = _gc_stats(gateway, out)
                rows.setdefault(label, []).append(row)
                gc_text = ""
                if "gc" in row:
                    per = 10_000 / max(1, row["requests"])
                    gens = row["gc"]["generations"]
                    gc_text = "  gc per 10k req: " + "  ".join(
                        f"g{g}: {gen['count'] * per:.0f}x {gen['total_ms'] * per:.1f} ms (p99 {gen['p99_ms']:.2f}, "
                        f"max {gen['max_ms']:.2f})" for g, gen in enumerate(gens))
                    gc_text += f"  tracked {row['gc']['tracked']}"
                print(f"round {round_no + 1} {label:18s} {row['requests'] / args.duration:7.0f} rps  "
                      f"p50 {row['p50_ms']:.3f}  p99 {row['p99_ms']:.3f}  max {row['max_ms']:.1f} ms  "
                      f"run queue {row['run_queue_ms_per_s']:.0f} ms/s{gc_text}",
                      flush=True)
        print(f"\n{args.mode}, c={args.connections}, {args.rounds} rounds of {args.duration:.0f} s: "
              "median (min-max) of the rounds")
        base = statistics.median(r["p99_ms"] for r in rows["upstream direct"])
        for label, runs in rows.items():
            p99s = [r["p99_ms"] for r in runs]
            p50s = [r["p50_ms"] for r in runs]
            waits = [r["run_queue_ms_per_s"] for r in runs]
            text = (f"  {label:18s} p50 {statistics.median(p50s):.3f}  p99 {statistics.median(p99s):.3f} "
                    f"({min(p99s):.3f}-{max(p99s):.3f})  run queue {min(waits):.0f}-{max(waits):.0f} ms/s")
            if label != "upstream direct":
                text += f"  p99 added {statistics.median(p99s) - base:+.3f} ms"
                g2 = [r["gc"]["generations"][2] for r in runs]
                requests = sum(r["requests"] for r in runs)
                text += (f"  gen-2 per 10k req {sum(g['count'] for g in g2) * 10_000 / requests:.1f}, "
                         f"max {max(g['max_ms'] for g in g2):.2f} ms")
            print(text)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "jitter.json").write_text(json.dumps(rows, indent=1))
    finally:
        for server in reversed(servers):
            server.stop()
        for spinner in spinners:
            spinner.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
