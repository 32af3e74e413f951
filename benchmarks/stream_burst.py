#!/usr/bin/env python
"""A burst of long streams: first-chunk latency while streams open at a rate, and memory per open stream.

    .venv/bin/python benchmarks/stream_burst.py                      # 900 streams at 150/s, 3 rounds
    .venv/bin/python benchmarks/stream_burst.py --streams 10000 --rate 500 --gap 4 --rounds 3   # issue #20

The fake upstream answers each stream with 7 events ``--gap`` seconds apart (so a stream lives
6 x gap seconds). The client opens ``--streams`` streams at ``--rate`` per second, through the bare
aiohttp proxy and through NexGate (full chain, one key), alternately, ``--rounds`` times each.
Reported per target: the time from sending a request to its first body bytes (median, p99), and
the server's RSS growth with every stream open, divided by the streams (KB per open stream), and
its RSS once all have closed.

Both servers get the same upstream pool, ``--pool`` (default: the streams + 1,000): the bare
proxy's connector limit and NexGate's ``upstream.max_connections`` (and ``server.max_connections``,
the client side); below the streams both would queue. The open-file limit (RLIMIT_NOFILE) of this
process and every server it starts is raised to hold each stream's two sockets in the proxy
(2 x streams + 100; the hard limit too where the process may, i.e. with CAP_SYS_RESOURCE). The client and the fake upstream share the load core, the servers the other one.
Writes ``benchmarks/results/stream_burst.json`` (``--json``).
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
    HERE, Server, check_chat, cores_available, free_port, nexgate_command, raise_open_files, request_body,
    tree_cpu_seconds, use_source)
from results_file import RESULTS, save  # noqa: E402


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class StreamClient(asyncio.Protocol):
    """One streamed chat completion over a raw socket: a load side of a few µs per event.

    An aiohttp client spends more CPU per stream than the proxies it measures, and lagging behind at
    500 streams/s it sent requests seconds after connecting (NexGate's header_timeout closes those).
    """

    def __init__(self, request: bytes, started: float, burst: Burst) -> None:
        self.request, self.started, self.burst = request, started, burst
        self.buf = b""
        self.status = 0
        self.counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        burst = self.burst
        if not self.status:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.buf[9:12])
            burst.statuses[self.status] = burst.statuses.get(self.status, 0) + 1
            if self.status != 200:
                self.transport.close()
                return
            data = self.buf[end + 4:]
            self.buf = b""
        if data and not self.counted:  # the first bytes of the body
            self.counted = True
            burst.firsts.append(time.perf_counter() - self.started)
            burst.open_now += 1
        self.buf = (self.buf + data)[-5:]
        if self.buf == b"0\r\n\r\n":  # the chunked body's end
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        burst = self.burst
        if self.counted:
            burst.open_now -= 1
        if self.status == 200 and self.buf != b"0\r\n\r\n" or not self.status:
            key = f"error: {type(exc).__name__ if exc else 'closed early'}"
            burst.statuses[key] = burst.statuses.get(key, 0) + 1
        burst.finished += 1
        if burst.finished == burst.total:
            burst.done.set_result(None)


class Burst:
    def __init__(self, total: int) -> None:
        self.total, self.finished, self.open_now = total, 0, 0
        self.firsts: list[float] = []
        self.statuses: dict[Any, int] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


async def burst(port: int, headers: dict[str, str], streams: int, rate: float, pid: int) -> dict[str, Any]:
    body = request_body(True)
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Type": "application/json"}.items())
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    state = Burst(streams)

    async def one() -> None:
        started = time.perf_counter()
        try:
            await loop.create_connection(lambda: StreamClient(request, started, state), "127.0.0.1", port)
        except OSError as exc:
            key = f"error: {type(exc).__name__}"
            state.statuses[key] = state.statuses.get(key, 0) + 1
            state.finished += 1
            if state.finished == state.total:
                state.done.set_result(None)

    before, cpu_before = rss_kb(pid), tree_cpu_seconds(pid)
    tasks = []
    start = time.perf_counter()
    peak, peak_open = before, 0
    for i in range(streams):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
        if i % 100 == 0 and state.open_now > peak_open:
            peak, peak_open = rss_kb(pid), state.open_now
    # The peak: the sample with the most streams open (on a loaded machine the last ones may open
    # late, while the first ones already end), RSS read every 0.2 s until every stream has ended.
    while not state.done.done():
        if state.open_now > peak_open:
            peak, peak_open = rss_kb(pid), state.open_now
        await asyncio.wait([state.done], timeout=0.2)
    await asyncio.gather(*tasks)
    cpu = tree_cpu_seconds(pid) - cpu_before
    await asyncio.sleep(1.0)
    firsts = sorted(state.firsts) or [0.0]
    return {"first_chunk_ms": {"p50": round(statistics.median(firsts) * 1000, 1),
                               "p99": round(firsts[max(0, int(len(firsts) * 0.99) - 1)] * 1000, 1)},
            "open_at_peak": peak_open, "kb_per_open_stream": round((peak - before) / max(1, peak_open), 1),
            "rss_before_mb": round(before / 1024, 1), "rss_peak_mb": round(peak / 1024, 1),
            "rss_after_mb": round(rss_kb(pid) / 1024, 1), "statuses": state.statuses,
            "cpu_ms_per_stream": round(cpu * 1000 / streams, 2)}  # the server's, opening to end


def run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


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
    parser.add_argument("--pool", type=int, default=0,
                        help="upstream connections at most, for both servers (default: streams + 1000)")
    parser.add_argument("--rev", help="benchmark this git revision instead of the work tree")
    parser.add_argument("--json", type=Path, default=RESULTS / "stream_burst.json", help="where to write results")
    parser.add_argument("--gc-probe", action="store_true",
                        help="run NexGate under gc_probe.py and print its collections per burst")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted config key for NexGate (YAML value), e.g. 'server.gc_thresholds=[700, 10, 10]'")
    args = parser.parse_args()
    pool = args.pool or args.streams + 1000
    # Each stream holds two sockets in the proxy (its client's and its upstream's), one here and one in
    # the fake upstream; the proxy's other files (listener, store, logs, event loop) take < 100.
    wanted = 2 * args.streams + 100
    got = raise_open_files(wanted)
    if got < wanted:
        raise SystemExit(f"RLIMIT_NOFILE is {got} (and the hard limit cannot be raised here), below the {wanted} "
                         f"open files a proxy needs for {args.streams} streams: at most {(got - 100) // 2} streams "
                         "(raise `ulimit -Hn` as root, or in the container's limits)")
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
                                     "--upstream", upstream.url, "--pool", str(pool)], bare_port, sut,
                      tmp / "bare.log")
        setup = gateway_setup(upstream.url, gw_port, tmp)
        setup.config["server"]["max_connections_per_ip"] = 0  # every stream comes from 127.0.0.1
        setup.config["server"]["max_connections"] = pool
        setup.config["upstream"] = {"max_connections": pool}  # the bare proxy's connector limit
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
            if 6 * args.gap - args.streams / args.rate <= 0.5:
                raise SystemExit("streams would end before the burst does: raise --gap or --rate")
            results: dict[str, list[dict[str, Any]]] = {"bare proxy": [], "NexGate": []}
            for round_index in range(args.rounds):
                order = [("bare proxy", bare, {}), ("NexGate", gateway, setup.headers)]
                if round_index % 2:
                    order.reverse()
                for label, server, headers in order:
                    if args.gc_probe and server is gateway:
                        gc_stats(gateway.pid, gc_out)  # counts from here
                    result = run_loop(burst(server.port, headers, args.streams, args.rate, server.pid))
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
    payload = {"streams": args.streams, "rate": args.rate, "gap": args.gap, "pool": pool, "rounds": args.rounds,
               "summary": summary, "runs": results}
    print(json.dumps({"source": source, **payload}, indent=1))
    save(args.json, payload, source)


if __name__ == "__main__":
    main()
