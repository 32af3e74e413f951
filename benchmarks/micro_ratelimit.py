"""CPU per request of the rate limiter alone: ``RateLimiter.admit`` + ``settle``, no HTTP.

Runs N admit+settle cycles of one ``RateLimiter`` with a realistic request (an authenticated key,
the benchmark's 250-byte chat body, an upstream usage of 11 + 7 tokens) and prints the CPU time
(``time.process_time``) per cycle, minus a baseline loop that builds the same contexts without the
limiter. Each scenario runs in interleaved rounds and reports its fastest round (the least disturbed
by other work on the machine). Scenarios: in-process (``memory://``) and against a real Redis, with rpm only and with every
limit (rpm + tpm + concurrent). On Redis, ``--concurrency`` requests are in flight at once, as under
load, and the Redis round trips per request are counted (``RedisScripts.round_trips``).

    /work/venv/bin/python benchmarks/micro_ratelimit.py                  # the work tree
    /work/venv/bin/python benchmarks/micro_ratelimit.py --rev HEAD       # a commit, to compare
    /work/venv/bin/python benchmarks/micro_ratelimit.py --redis none     # in-process only

Redis keys go under a random prefix and expire on their own (one window).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from inspect import isawaitable
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REQUEST_BODY, use_source  # noqa: E402

HIGH = {"rpm": 1_000_000_000, "tpm": 1_000_000_000_000, "concurrent": 1_000_000}
SCENARIOS: dict[str, dict[str, int]] = {
    "rpm": {"rpm": HIGH["rpm"]},
    "rpm+tpm": {"rpm": HIGH["rpm"], "tpm": HIGH["tpm"]},
    "all": dict(HIGH),
}


def make_limiter(quota: dict[str, int], state_url: str) -> Any:
    from nexgate_plugins.ratelimit.limiter import RateLimiter
    from nexgate_plugins.ratelimit.settings import LimitSettings, Quota

    prefix = f"bench:rl:{secrets.token_hex(4)}"
    return RateLimiter(LimitSettings(key=Quota(**quota), redis_prefix=prefix), state_url)


def context_factory() -> Callable[[int], Any]:
    """A fresh RequestContext per request, as the proxy builds it (prompt estimated once, by credits)."""
    from nexgate_proxy.context import Identity, RequestContext

    identity = Identity(account_id="usr_bench", key_id="key_bench", key_prefix="ngk_bench")
    raw = json.dumps(REQUEST_BODY).encode()
    body = json.loads(raw)  # shared: the limiter only reads it, and a parse per request would be noise

    def make(i: int) -> Any:
        ctx = RequestContext(request_id=f"req_{i:012d}", endpoint="chat.completions", api_format="openai",
                             request=None, app=None, client_ip="127.0.0.1", body=body, body_size=len(raw),
                             model="bench-model", identity=identity)
        ctx.prompt_estimate()
        return ctx

    return make


def answered(ctx: Any) -> None:
    """What the proxy records before settle: a 200 with the upstream's usage."""
    ctx.status = 200
    ctx.first_byte_at = time.perf_counter()
    ctx.usage.prompt_tokens, ctx.usage.completion_tokens, ctx.usage.reported = 11, 7, True


async def run_cycles(limiter: Any, n: int, concurrency: int, make: Callable[[int], Any]) -> float:
    """CPU seconds for n requests, `concurrency` at a time (limiter None: the baseline loop).

    The plugin's admit and settle hooks are called as the hook chain calls them: a plain function's
    result is awaited when it is awaitable.
    """
    from nexgate_plugins.ratelimit import LIMITER, nexgate_admit, nexgate_settle

    app = {LIMITER: limiter}  # all the hooks read of the app

    async def one(i: int) -> None:
        ctx = make(i)
        if limiter is not None:
            ctx.app = app
            pending = nexgate_admit(ctx)
            if pending is not None and isawaitable(pending):
                await pending
        answered(ctx)
        if limiter is not None:
            pending = nexgate_settle(ctx)
            if pending is not None and isawaitable(pending):
                await pending

    started = time.process_time()
    for base in range(0, n, concurrency):
        if concurrency == 1:
            await one(base)
        else:
            await asyncio.gather(*[one(i) for i in range(base, min(n, base + concurrency))])
    return time.process_time() - started


async def measure(name: str, quota: dict[str, int], state_url: str, n: int, concurrency: int,
                  rounds: int) -> dict[str, Any]:
    make = context_factory()
    limiter = make_limiter(quota, state_url)
    await limiter.start(None)
    try:
        await run_cycles(limiter, min(n, 2000), concurrency, make)  # warm up: caches, connection, scripts
        redis = limiter.redis
        trips_before = redis.round_trips if redis is not None else 0
        fallback_before = limiter.fallback_decisions
        per_round = max(1, n // rounds)
        base, spent = [], []
        for _ in range(rounds):  # interleaved, so both loops share any drift of a noisy host
            base.append(await run_cycles(None, per_round, concurrency, make))
            spent.append(await run_cycles(limiter, per_round, concurrency, make))
        if redis is not None:
            await asyncio.sleep(0.05)  # let a deferred write go out before counting
        trips = (redis.round_trips - trips_before) / (per_round * rounds) if redis is not None else 0.0
        fell_back = limiter.fallback_decisions - fallback_before
    finally:
        await limiter.stop()
    # The fastest round of each: the least disturbed by whatever else runs on the machine.
    return {"scenario": name, "state": "redis" if state_url.startswith("redis") else "memory",
            "concurrency": concurrency, "us_per_request": (min(spent) - min(base)) / per_round * 1e6,
            "baseline_us": min(base) / per_round * 1e6, "round_trips_per_request": trips, "fallback": fell_back}


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for name in args.scenarios:
        results.append(await measure(name, SCENARIOS[name], "memory://", args.requests, 1, args.rounds))
    if args.redis != "none":
        for name in args.scenarios:
            for concurrency in args.concurrency:
                results.append(await measure(name, SCENARIOS[name], args.redis, args.redis_requests, concurrency,
                                             args.rounds))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", help="measure the limiter as committed at this git revision (e.g. HEAD)")
    parser.add_argument("--requests", type=int, default=50_000, help="cycles per in-process scenario")
    parser.add_argument("--redis-requests", type=int, default=20_000, help="cycles per Redis scenario")
    parser.add_argument("--rounds", type=int, default=25, help="rounds per scenario; the fastest counts")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL, or 'none'")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="requests in flight (Redis)")
    parser.add_argument("--scenarios", nargs="+", default=["rpm", "rpm+tpm", "all"], choices=list(SCENARIOS))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    source = use_source(args.rev)
    try:
        import uvloop  # the gateway's loop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    results = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps({"source": source, "results": results}, indent=2))
        return
    print(f"rate limiter admit+settle, {source}")
    print(f"{'state':8} {'limits':8} {'in flight':>9} {'us/request':>11} {'round trips':>12} {'fallback':>9}")
    for r in results:
        print(f"{r['state']:8} {r['scenario']:8} {r['concurrency']:>9} {r['us_per_request']:>11.1f} "
              f"{r['round_trips_per_request']:>12.2f} {r['fallback']:>9}")


if __name__ == "__main__":
    main()
