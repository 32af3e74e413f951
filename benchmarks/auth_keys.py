#!/usr/bin/env python
"""Many API keys: what a restart and a too-small key cache cost the gateway, in CPU seconds and rps.

    .venv/bin/python benchmarks/auth_keys.py restart --keys 10000 --rounds 4        # about 2 minutes a run
    .venv/bin/python benchmarks/auth_keys.py restart --keys 100 --rounds 12 --rev d75fa6c
    .venv/bin/python benchmarks/auth_keys.py eviction --keys 100 --cache-size 50 --rounds 12

restart: a real ``nexgate serve`` (full plugin chain, SQLite) serves one chat completion with each of
``--keys`` keys, is stopped (SIGTERM) and started again on the same files; then each key sends one
request again (32 at a time). Reported: the restarted process's CPU seconds from ready until every
key was served, and the wall time. Every key must be served (a 503 auth_busy, too many cold keys at
once, is retried after 0.1 s, as a client would; those are counted).

eviction: ``auth.cache_size`` smaller than the keys in use, the keys sent round robin (every request
misses the identity cache); after one warm pass, rps (200s) and CPU per request for ``--duration`` seconds.

The keys share one bcrypt hash of cost ``--rounds`` (one secret, distinct public ids: hashing 10,000
secrets at cost 12 would take 40 CPU minutes). A cache miss still pays one full bcrypt per key: the
cache and the verifiers are per key, not per hash. ``--rev`` benchmarks a commit (harness.use_source).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    HERE,
    Server,
    cores_available,
    free_port,
    nexgate_command,
    request_body,
    use_source,
)
from results_file import RESULTS, save  # noqa: E402

CONCURRENCY = 32


async def add_keys(storage_url: str, count: int, rounds: int) -> list[str]:
    """``count`` keys of the benchmark's user, sharing one secret (and its bcrypt hash of cost ``rounds``)."""
    from nexgate_proxy import keys
    from nexgate_proxy.store import open_store

    secret = keys.generate_key().secret
    secret_hash = keys.hash_secret(secret, rounds=rounds)
    store = await open_store(storage_url)
    try:
        user = (await store.list_users())[0]
        out = []
        for i in range(count):
            public_id = keys.generate_key().public_id
            await store.create_api_key(public_id=public_id, prefix=keys.display_prefix(public_id),
                                       secret_hash=secret_hash, name=f"bench-{i}", user_id=user.id)
            body = f"{keys.KEY_PREFIX}{public_id}_{secret}"
            out.append(body + keys._checksum(body))
        return out
    finally:
        await store.close()


async def send_all(port: int, plaintexts: list[str], *, until: float | None = None) -> tuple[int, dict[int, int]]:
    """Each key once (or round robin until ``until``), CONCURRENCY at a time; (requests, statuses)."""
    import aiohttp

    body = request_body(False)
    statuses: dict[int, int] = {}
    sent = 0
    index = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent, index
        while True:
            if until is None:
                if index >= len(plaintexts):
                    return
            elif time.monotonic() >= until:
                return
            key = plaintexts[index % len(plaintexts)]
            index += 1
            while True:
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                        headers={"Authorization": f"Bearer {key}",
                                                 "Content-Type": "application/json"}) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    sent += 1
                if resp.status != 503:  # auth_busy: too many cold keys at once; a client retries
                    break
                await asyncio.sleep(0.1)

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    return sent, statuses


def one_run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from gateway_config import gateway_setup, write_gateway_config

    cores = cores_available()
    sut, load = (cores[0], cores[1]) if len(cores) >= 2 and not args.no_pin else (None, None)
    if load is not None:
        os.sched_setaffinity(0, {load})
    up_port = free_port()
    upstream = Server("fake upstream", [sys.executable, str(HERE / "fake_upstream.py"), "--port", str(up_port)],
                      up_port, load, tmp / "upstream.log")
    upstream.start()
    servers = [upstream]
    try:
        port = free_port()
        setup = gateway_setup(upstream.url, port, tmp)
        setup.config["auth"] = {"required": True, "cache_size": args.cache_size or 100_000}
        setup.config.setdefault("limits", {})["ip"] = {"rpm": 0}
        plaintexts = asyncio.run(add_keys(setup.config["storage"]["url"], args.keys, args.rounds))
        config = write_gateway_config(setup, tmp / "nexgate-bench.yaml")
        cmd = [*nexgate_command(), "--log-level", "WARNING", "serve", "--config", str(config)]

        def start(name: str) -> Server:
            gateway = Server(name, cmd, port, sut, tmp / f"{name}.log", env=setup.env, cwd=tmp)
            gateway.start()
            servers.append(gateway)
            gateway.wait_ready("/healthz", timeout=60)
            return gateway

        first = start("nexgate-first")
        started = time.monotonic()
        sent, statuses = asyncio.run(send_all(port, plaintexts))
        warm = {"seconds": round(time.monotonic() - started, 2), "cpu_s": round(first.cpu_seconds(), 2),
                "statuses": statuses}
        if statuses.get(200) != len(plaintexts) or set(statuses) - {200, 503}:
            raise RuntimeError(f"warm pass: {statuses}")
        if args.scenario == "eviction":
            cpu0, t0 = first.cpu_seconds(), time.monotonic()
            sent, statuses = asyncio.run(send_all(port, plaintexts, until=t0 + args.duration))
            wall, cpu = time.monotonic() - t0, first.cpu_seconds() - cpu0
            if set(statuses) - {200, 503}:
                raise RuntimeError(f"eviction pass: {statuses}")
            served = statuses.get(200, 0)
            return {"warm": warm, "requests": sent, "rps": round(served / wall, 1), "retried_503": statuses.get(503, 0),
                    "cpu_us_per_request": round(cpu / max(1, served) * 1e6), "statuses": statuses}
        first.stop()
        servers.remove(first)
        second = start("nexgate-restarted")
        cpu0, t0 = second.cpu_seconds(), time.monotonic()
        sent, statuses = asyncio.run(send_all(port, plaintexts))
        wall, cpu = time.monotonic() - t0, second.cpu_seconds() - cpu0
        if statuses.get(200) != len(plaintexts) or set(statuses) - {200, 503}:
            raise RuntimeError(f"after the restart: {statuses}")
        return {"warm": warm, "restart_cpu_s": round(cpu, 2), "restart_wall_s": round(wall, 2),
                "retried_503": statuses.get(503, 0),
                "cpu_ms_per_key": round(cpu / len(plaintexts) * 1000, 3)}
    finally:
        for server in reversed(servers):
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=("restart", "eviction"))
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=12, help="bcrypt cost of the keys' (shared) hash")
    parser.add_argument("--cache-size", type=int, default=0, help="auth.cache_size (eviction: default keys/2)")
    parser.add_argument("--duration", type=float, default=10.0, help="eviction: seconds measured")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rev", help="benchmark this git revision instead of the work tree")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path, help="where to write results (default results/auth_<scenario>.json)")
    args = parser.parse_args()
    if args.scenario == "eviction" and not args.cache_size:
        args.cache_size = max(1, args.keys // 2)
    source = use_source(args.rev)
    import tempfile

    runs = []
    for index in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="nexgate-bench-keys-") as tmp:
            result = one_run(args, Path(tmp))
        print(f"run {index + 1}: {json.dumps(result)}", flush=True)
        runs.append(result)
    figure = "restart_cpu_s" if args.scenario == "restart" else "rps"
    values = [r[figure] for r in runs]
    payload = {"scenario": args.scenario, "keys": args.keys, "rounds": args.rounds,
               "cache_size": args.cache_size or None, figure: {"median": statistics.median(values),
                                                               "min": min(values), "max": max(values)},
               "runs": runs}
    print(json.dumps({"source": source, **payload}, indent=1))
    save(args.json or RESULTS / f"auth_{args.scenario}.json", payload, source)


if __name__ == "__main__":
    main()
