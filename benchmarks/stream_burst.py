#!/usr/bin/env python
"""A burst of long streams: first-chunk latency while streams open at a rate, and memory per open stream.

    .venv/bin/python benchmarks/stream_burst.py                      # 900 streams at 150/s, 3 rounds
    .venv/bin/python benchmarks/stream_burst.py --streams 2000 --rate 300 --gap 3

The fake upstream answers each stream with 7 events ``--gap`` seconds apart (so a stream lives
6 x gap seconds). The client opens ``--streams`` streams at ``--rate`` per second, through the bare
aiohttp proxy and through NexGate (full chain, one key), alternately, ``--rounds`` times each.
Reported per target: the time from sending a request to its first body bytes (median, p99), and
the server's RSS growth with every stream open, divided by the streams (KB per open stream), and
its RSS once all have closed. The bare proxy's pool is 1,000 connections, NexGate's
``upstream.max_connections`` 1,000: keep ``--streams`` below that, or both queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    HERE, Server, check_chat, cores_available, free_port, nexgate_command, request_body, use_source)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def burst(port: int, headers: dict[str, str], streams: int, rate: float, pid: int,
                hold: float) -> dict[str, Any]:
    import aiohttp

    body = request_body(True)
    firsts: list[float] = []
    statuses: dict[int, int] = {}
    open_now = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal open_now
        started = time.perf_counter()
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                headers={**headers, "Content-Type": "application/json"}) as resp:
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            await resp.content.readany()
            if resp.status != 200:
                return
            firsts.append(time.perf_counter() - started)
            open_now += 1
            await resp.read()
            open_now -= 1

    before = rss_kb(pid)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        tasks = []
        start = time.perf_counter()
        for i in range(streams):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session)))
        # Every stream is open now (each lives longer than the burst): the peak.
        await asyncio.sleep(min(hold, 1.0))
        peak, peak_open = rss_kb(pid), open_now
        await asyncio.gather(*tasks)
    await asyncio.sleep(1.0)
    firsts.sort()
    return {"first_chunk_ms": {"p50": round(statistics.median(firsts) * 1000, 1),
                               "p99": round(firsts[int(len(firsts) * 0.99) - 1] * 1000, 1)},
            "open_at_peak": peak_open, "kb_per_open_stream": round((peak - before) / max(1, peak_open), 1),
            "rss_before_mb": round(before / 1024, 1), "rss_peak_mb": round(peak / 1024, 1),
            "rss_after_mb": round(rss_kb(pid) / 1024, 1), "statuses": statuses}


def gc_stats(pid: int, out: Path) -> dict[str, Any]:
    """gc_probe.py's collections since the last call (SIGUSR1 makes it write them)."""
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    for _ in range(100):
        time.sleep(0.05)
        if out.exists() and out.stat().st_size:
            time.sleep(0.05)
            return json.loads(out.read_text())
    raise RuntimeError("gc_probe.py wrote no stats")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=900)
    parser.add_argument("--rate", type=float, default=150.0, help="streams opened per second")
    parser.add_argument("--gap", type=float, default=2.0, help="seconds between a stream's events")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rev", help="benchmark this git revision instead of the work tree")
    parser.add_argument("--gc-probe", action="store_true",
                        help="run NexGate under gc_probe.py and print its collections per burst")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted config key for NexGate (YAML value), e.g. server.gc_full_every=0")
    args = parser.parse_args()
    source = use_source(args.rev)
    import tempfile

    from gateway_config import gateway_setup, write_gateway_config

    cores = cores_available()
    sut, load = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    if load is not None:
        os.sched_setaffinity(0, {load})
    with tempfile.TemporaryDirectory(prefix="nexgate-bench-burst-") as name:
        tmp = Path(name)
        up_port, bare_port, gw_port = free_port(), free_port(), free_port()
        upstream = Server("fake upstream", [sys.executable, str(HERE / "fake_upstream.py"), "--port", str(up_port),
                                            "--event-gap", str(args.gap)], up_port, load, tmp / "upstream.log")
        bare = Server("bare proxy", [sys.executable, str(HERE / "bare_proxy.py"), "--port", str(bare_port),
                                     "--upstream", upstream.url], bare_port, sut, tmp / "bare.log")
        setup = gateway_setup(upstream.url, gw_port, tmp)
        setup.config["server"]["max_connections_per_ip"] = 0  # every stream comes from 127.0.0.1
        setup.config.setdefault("limits", {})["ip"] = {"rpm": 0}
        setup.config["limits"]["key"] = {"rpm": 10**9, "tpm": 10**12, "concurrent": 10**6}
        for item in args.set:
            key, _, value = item.partition("=")
            *path, last = key.split(".")
            section = setup.config
            for name in path:
                section = section.setdefault(name, {})
            section[last] = yaml.safe_load(value)
        config = write_gateway_config(setup, tmp / "nexgate-bench.yaml")
        gc_out = tmp / "gc.json"
        command = [sys.executable, str(HERE / "gc_probe.py"), str(gc_out)] if args.gc_probe else nexgate_command()
        gateway = Server("NexGate", [*command, "--log-level", "WARNING", "serve", "--config", str(config)],
                         gw_port, sut, tmp / "nexgate.log", env=setup.env, cwd=tmp)
        servers = [upstream, bare, gateway]
        try:
            for server in servers:
                server.start()
            gateway.wait_ready("/healthz", timeout=60)
            check_chat(gateway.port, False, setup.headers)  # the key's one bcrypt, before any burst
            check_chat(bare.port, False)
            hold = 6 * args.gap - args.streams / args.rate
            if hold <= 0.5:
                raise SystemExit("streams would end before the burst does: raise --gap or --rate")
            results: dict[str, list[dict[str, Any]]] = {"bare proxy": [], "NexGate": []}
            for round_index in range(args.rounds):
                order = [("bare proxy", bare, {}), ("NexGate", gateway, setup.headers)]
                if round_index % 2:
                    order.reverse()
                for label, server, headers in order:
                    if args.gc_probe and server is gateway:
                        gc_stats(gateway.pid, gc_out)  # counts from here
                    result = asyncio.run(burst(server.port, headers, args.streams, args.rate, server.pid, hold))
                    if args.gc_probe and server is gateway:
                        result["gc"] = gc_stats(gateway.pid, gc_out)["generations"]
                    print(f"round {round_index + 1} {label}: {json.dumps(result)}", flush=True)
                    results[label].append(result)
        finally:
            for server in reversed(servers):
                server.stop()
    summary = {label: {"first_chunk_p99_ms": statistics.median(r["first_chunk_ms"]["p99"] for r in runs),
                       "p99_range": [min(r["first_chunk_ms"]["p99"] for r in runs),
                                     max(r["first_chunk_ms"]["p99"] for r in runs)],
                       "first_chunk_p50_ms": statistics.median(r["first_chunk_ms"]["p50"] for r in runs),
                       "kb_per_open_stream": statistics.median(r["kb_per_open_stream"] for r in runs),
                       "kb_range": [min(r["kb_per_open_stream"] for r in runs),
                                    max(r["kb_per_open_stream"] for r in runs)],
                       "rss_after_mb": runs[-1]["rss_after_mb"]}
               for label, runs in results.items()}
    print(json.dumps({"source": source, "streams": args.streams, "rate": args.rate, "gap": args.gap,
                      "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
