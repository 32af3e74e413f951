#!/usr/bin/env python
"""Instructions per request of NexGate, counted by valgrind (callgrind): a figure that does not move.

Throughput figures on this 2-core machine move by +-5% between two identical processes, so a
change of a few microseconds per request cannot be told from noise with ``run.py``. Callgrind
counts the instructions the gateway executes instead: the same code serving the same requests
gives the same count to ~0.02%, whatever else the machine does. It is a proxy for CPU time (it
does not see cache misses), so use it to compare, and ``run.py`` for the throughput itself.

Each configuration (the full chain, and ``LABEL=PLUGINS`` variants with those built-ins
disabled, as ``run.py --variant``) starts a NexGate under ``valgrind --tool=callgrind`` with
instrumentation off, warms it up, switches counting on for ``--requests`` requests at
``--concurrency`` (a plain aiohttp client), and reads the count from the dump. The rows print
thousands of instructions (kIr) per request and the difference to the first row.

    sudo apt-get install -y valgrind
    /work/venv/bin/python benchmarks/instructions.py --variant "no limits=ratelimit"
    /work/venv/bin/python benchmarks/instructions.py --mode stream --variant "no credits=credits"
    /work/venv/bin/python benchmarks/instructions.py --rev HEAD~1      # a commit, to compare

The stores come from NEXGATE_BENCH_STORAGE_URL / NEXGATE_BENCH_STATE_URL as for run.py (a
PostgreSQL schema is emptied before each configuration; Redis state is not: point it at a
database of its own). Under valgrind the gateway serves ~100 requests a second, so work done
per second rather than per request (timers, lease renewals) weighs ~30 times more than at full
load: compare configurations that share it. Callgrind dumps are kept with ``--keep`` for
``callgrind_annotate`` (C functions only: Python frames show as the interpreter's loop).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import HOST, PATH, Server, free_port, nexgate_command, request_body, use_source  # noqa: E402



async def load(port: int, headers: dict[str, str], body: bytes, requests: int, concurrency: int) -> None:
    import aiohttp

    todo = iter(range(requests))
    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            for _ in todo:
                async with session.post(f"http://{HOST}:{port}{PATH}", data=body,
                                        headers={**headers, "Content-Type": "application/json"}) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"NexGate answered {response.status}")
        await asyncio.gather(*[worker() for _ in range(concurrency)])


def counted(dump_prefix: Path) -> int:
    """The instructions of the dumps callgrind_control --dump wrote (the counted window only)."""
    total = 0
    for path in glob.glob(f"{dump_prefix}.*"):
        with open(path) as f:
            for line in f:
                if line.startswith("totals:") or line.startswith("summary:"):
                    total += int(line.split()[1])
                    break
    return total


def empty_schema(storage_url: str) -> None:
    if storage_url.startswith("postgresql"):
        schema = storage_url.partition("search_path=")[2].split("&")[0] or "public"
        subprocess.run(["psql", storage_url.split("?")[0], "-q", "-c",
                        f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"],
                       check=True, capture_output=True)


def measure(label: str, disable: list[str], upstream_url: str, workdir: Path, args: argparse.Namespace) -> float:
    from gateway_config import gateway_setup, write_gateway_config  # after use_source: it imports NexGate

    empty_schema(os.environ.get("NEXGATE_BENCH_STORAGE_URL", ""))
    port = free_port()
    setup = gateway_setup(upstream_url, port, workdir, disable=disable)
    if "limits" in setup.config:  # Redis answers ~30 times later under valgrind: no timeouts for that
        setup.config["limits"]["redis_timeout_ms"] = 5000
    config = write_gateway_config(setup, workdir / "nexgate.yaml")
    dump = workdir / "callgrind.out"
    gateway = Server(f"NexGate {label}", ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                          f"--callgrind-out-file={dump}", *nexgate_command(),
                                          "--log-level", "WARNING", "serve", "--config", str(config)],
                     port, None, workdir / "nexgate.log", env=setup.env, cwd=workdir)
    gateway.start()
    try:
        gateway.wait_ready("/healthz", timeout=300)
        body = request_body(args.mode == "stream")
        asyncio.run(load(port, setup.headers, body, args.warmup, args.concurrency))
        subprocess.run(["callgrind_control", "--instr=on", str(gateway.pid)], check=True, capture_output=True)
        asyncio.run(load(port, setup.headers, body, args.requests, args.concurrency))
        subprocess.run(["callgrind_control", "--dump", str(gateway.pid)], check=True, capture_output=True)
        for _ in range(100):  # the dump is written by the gateway process itself
            if glob.glob(f"{dump}.*"):
                break
            time.sleep(0.1)
        time.sleep(0.5)
        return counted(dump) / args.requests
    finally:
        gateway.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("json", "stream"), default="json")
    parser.add_argument("--requests", type=int, default=1500, help="requests counted per configuration (1500)")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting starts (300)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=PLUGINS",
                        help="also count NexGate with these built-ins disabled, e.g. 'no limits=ratelimit'")
    parser.add_argument("--keep", action="store_true", help="keep the callgrind dumps (their directory is printed)")
    parser.add_argument("--rev", help="count NexGate as committed at this git revision instead of the work tree")
    parser.add_argument("--json", type=Path, help="where to write results (default results/instructions_<mode>.json)")
    args = parser.parse_args()
    source = use_source(args.rev)
    print(f"NexGate source: {source}")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed: sudo apt-get install -y valgrind")
    configs: list[tuple[str, list[str]]] = [("full chain", [])]
    for text in args.variant:
        label, sep, plugins = text.partition("=")
        if not sep or not label.strip():
            sys.exit(f"--variant {text!r}: expected LABEL=PLUGIN[,PLUGIN...]")
        configs.append((label.strip(), [p.strip() for p in plugins.split(",") if p.strip()]))
    tmp = Path(tempfile.mkdtemp(prefix="nexgate-instructions-"))
    upstream_port = free_port()
    upstream = Server("fake upstream", [sys.executable, str(Path(__file__).with_name("fake_upstream.py")),
                                        "--port", str(upstream_port)], upstream_port, None, tmp / "upstream.log")
    upstream.start()
    try:
        upstream.wait_ready("/health")
        results = []
        for index, (label, disable) in enumerate(configs):
            workdir = tmp / f"config-{index}"
            workdir.mkdir()
            per_request = measure(label, disable, upstream.url, workdir, args)
            results.append((label, per_request))
            print(f"{label:24s} {per_request / 1000:9.1f} kIr/request", flush=True)
        base = results[0][1]
        from results_file import RESULTS, save

        save(args.json or RESULTS / f"instructions_{args.mode}.json",
             {"mode": args.mode, "requests": args.requests, "concurrency": args.concurrency,
              "instructions_per_request": {label: round(n) for label, n in results}}, source)
        print(f"\n{args.mode}, {args.requests} requests at concurrency {args.concurrency}; vs the full chain:")
        for label, per_request in results[1:]:
            print(f"  {label:22s} {(per_request - base) / 1000:+8.1f} kIr/request "
                  f"({(per_request - base) / base * 100:+.1f}%)")
    finally:
        upstream.stop()
        if args.keep:
            print(f"dumps kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
