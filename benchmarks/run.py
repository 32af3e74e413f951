#!/usr/bin/env python
"""NexGate load benchmark: fake upstream direct vs bare aiohttp proxy vs NexGate, in one run.

    /work/venv/bin/python benchmarks/run.py            # full run, 2 to 3 minutes
    /work/venv/bin/python benchmarks/run.py --quick    # smoke run, about 1 minute

Needs wrk (``apt-get install wrk``). Writes benchmarks/results/latest.json.
See benchmarks/README.md for what is measured and how to read it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    HERE,
    Server,
    Stack,
    machine_busy_seconds,
    repin,
    run_wrk,
    use_source,
    wrk_path,
    wrk_version,
)
from litellm_target import litellm_executable, litellm_version  # noqa: E402

TARGET_RPS_RATIO = 0.80
TARGET_ADDED_MEDIAN_MS = 1.0
FOREIGN_WARN = 0.10
"""A round during which processes outside the benchmark used more than this share of a core is disturbed."""


class RETRY_BUDGET:  # noqa: N801 - a namespace
    """Disturbed rounds are measured again, for at most this many extra seconds per run."""

    seconds = 45.0
    spent = 0.0
    rounds = 0


Row = tuple[str, Server]


@contextmanager
def placed(stack: Stack, key: str) -> Iterator[None]:
    """For the 'upstream direct' rows the fake upstream runs where the server under test runs."""
    if key != "upstream":
        yield
        return
    repin(stack.upstream.pid, stack.sut_core)
    try:
        yield
    finally:
        repin(stack.upstream.pid, stack.load_core)


def _percentile(hist: list[tuple[int, int]], total: int, p: float) -> int:
    rank = max(1, math.ceil(total * p / 100))
    seen = 0
    for value, count in hist:
        seen += count
        if seen >= rank:
            return value
    return hist[-1][0] if hist else 0


def _latency(hist_counter: Counter[int]) -> dict[str, float]:
    hist = sorted(hist_counter.items())
    total = sum(c for _, c in hist)
    if not total:
        return {}
    mean = sum(v * c for v, c in hist) / total
    return {"min": hist[0][0], "mean": round(mean, 1), "p50": _percentile(hist, total, 50),
            "p90": _percentile(hist, total, 90), "p99": _percentile(hist, total, 99),
            "p999": _percentile(hist, total, 99.9), "max": hist[-1][0], "samples": total}


def phase(stack: Stack, rows: list[Row], *, stream: bool, connections: int, warmup: float, duration: float,
          rounds: int, label: str) -> dict[str, Any]:
    """Warm each target up, then ``rounds`` interleaved runs per target (A B C, C B A, ...), merged.

    Interleaving spreads slow drifts of this shared VM evenly over the targets, so the ratios between
    them stay fair even when the absolute numbers move from one minute to the next.
    """
    per_round = max(1, round(duration / rounds))
    acc: dict[str, dict[str, Any]] = {
        key: {"requests": 0, "duration_us": 0, "errors": Counter(), "hist": Counter(), "cpu_sut": 0.0,
              "cpu_up": 0.0, "cpu_wrk": 0.0, "wall": 0.0, "round_rps": [], "round_cpu": [], "round_p50": [],
              "round_p99": [], "foreign": [], "retried": 0}
        for key, _ in rows
    }
    for key, server in rows:
        headers = stack.headers_for(server)
        with placed(stack, key):
            run_wrk(server.port, connections, warmup, stack.body_files[stream], headers, stack.load_core)
    for r in range(rounds):
        for key, server in (rows if r % 2 == 0 else rows[::-1]):
            headers = stack.headers_for(server)
            a = acc[key]
            while True:
                with placed(stack, key):
                    cpu_sut, cpu_up, t0 = server.cpu_seconds(), stack.upstream.cpu_seconds(), time.perf_counter()
                    own, busy = stack.own_cpu_seconds(), machine_busy_seconds()
                    res = run_wrk(server.port, connections, per_round, stack.body_files[stream], headers,
                                  stack.load_core)
                    wall = time.perf_counter() - t0
                    cpu_sut = server.cpu_seconds() - cpu_sut
                    cpu_up = stack.upstream.cpu_seconds() - cpu_up
                    # CPU the machine spent on anything but this benchmark (e.g. someone's test suite).
                    other = (machine_busy_seconds() - busy) - (stack.own_cpu_seconds() - own) - res["wrk_cpu_s"]
                    foreign = max(0.0, other / wall)
                if foreign <= FOREIGN_WARN or RETRY_BUDGET.spent + per_round > RETRY_BUDGET.seconds:
                    break
                # Disturbed by another process: measure this round again, within the run's retry budget.
                RETRY_BUDGET.spent += per_round
                RETRY_BUDGET.rounds += 1
                a["retried"] += 1
                time.sleep(0.5)
            a["wall"] += wall
            a["cpu_sut"] += cpu_sut
            a["cpu_up"] += cpu_up
            a["foreign"].append(foreign)
            a["cpu_wrk"] += res["wrk_cpu_s"]
            a["requests"] += res["requests"]
            a["duration_us"] += res["duration_us"]
            a["errors"].update(res["errors"])
            a["hist"].update({v: c for v, c in res["hist"]})
            a["round_rps"].append(round(res["requests"] / (res["duration_us"] / 1e6), 1))
            # Per-round figures: the report gives each figure's median and spread over the rounds.
            a["round_cpu"].append(round(cpu_sut * 1e6 / max(1, res["requests"]), 1))
            one = _latency(Counter({v: c for v, c in res["hist"]}))
            a["round_p50"].append(one.get("p50", 0))
            a["round_p99"].append(one.get("p99", 0))
    out: dict[str, Any] = {}
    for key, server in rows:
        a = acc[key]
        row: dict[str, Any] = {
            "connections": connections,
            "rounds": rounds,
            "duration_s": round(a["duration_us"] / 1e6, 2),
            "requests": a["requests"],
            "errors": dict(a["errors"]),
            "rps": round(a["requests"] / (a["duration_us"] / 1e6), 1),
            "round_rps": a["round_rps"],
            "round_cpu_us_per_req": a["round_cpu"],
            "round_p50_us": a["round_p50"],
            "round_p99_us": a["round_p99"],
            "latency_us": _latency(a["hist"]),
            "server_cpu_util": round(a["cpu_sut"] / a["wall"], 3),
            "server_cpu_us_per_req": round(a["cpu_sut"] * 1e6 / max(1, a["requests"]), 1),
            "wrk_cpu_util": round(a["cpu_wrk"] / a["wall"], 3),
            "foreign_cpu_util_max": round(max(a["foreign"]), 3),
            "rounds_retried": a["retried"],
        }
        if key != "upstream":
            row["upstream_cpu_util"] = round(a["cpu_up"] / a["wall"], 3)
            row["load_core_util"] = round((a["cpu_up"] + a["cpu_wrk"]) / a["wall"], 3)
        out[key] = row
        errors = sum(a["errors"].values())
        lat = row["latency_us"]
        print(f"  {label:<10} c={connections:<3} {server.name:<14} {row['rps']:>9.0f} rps "
              f"(rounds {min(a['round_rps']):.0f}..{max(a['round_rps']):.0f})  p50 {lat['p50'] / 1000:6.3f} ms  "
              f"p99 {lat['p99'] / 1000:6.3f} ms  {row['server_cpu_us_per_req']:6.1f} CPU us/req"
              + (f"  ({a['retried']} disturbed rounds redone)" if a["retried"] else "")
              + (f"  !! {errors} errors {dict(a['errors'])}" if errors else "")
              + (f"  !! other processes used up to {max(a['foreign']):.0%} of a core"
                 if max(a["foreign"]) > FOREIGN_WARN else ""), flush=True)
    return out


def run_all(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    assert stack.bare and stack.gateway
    rows: list[Row] = [("upstream", stack.upstream), ("bare", stack.bare), ("nexgate", stack.gateway)]
    if stack.litellm:
        rows.append(("litellm", stack.litellm))
    # Variants (--variant) are throughput rows only: interleaved with the full chain, so "with X vs
    # without X" shares any drift of the machine, like NexGate vs the bare proxy does.
    throughput_rows = (rows + [(variant_key(label), server) for label, server in stack.variants]
                       + [(f"workers:{count}", server) for count, server in stack.workers])
    results: dict[str, Any] = {"throughput": {}, "latency": {}}
    for mode, stream in (("json", False), ("stream", True)):
        results["throughput"][mode] = phase(
            stack, throughput_rows, stream=stream, connections=args.connections, warmup=args.warmup,
            duration=args.duration, rounds=args.rounds, label=f"{mode} tput")
        results["latency"][mode] = phase(
            stack, rows, stream=stream, connections=1, warmup=args.latency_warmup,
            duration=args.latency_duration, rounds=args.rounds, label=f"{mode} lat")
    return results


def variant_key(label: str) -> str:
    return f"variant:{label}"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """--variant 'no credits=credits' or 'no limits=ratelimit' (several plugins: 'a,b')."""
    label, sep, plugins = text.partition("=")
    names = [p.strip() for p in plugins.split(",") if p.strip()]
    if not sep or not label.strip() or not names:
        raise argparse.ArgumentTypeError("expected LABEL=PLUGIN[,PLUGIN...], e.g. 'no credits=credits'")
    return label.strip(), names


def variant_costs(results: dict[str, Any]) -> dict[str, Any]:
    """What the plugins a variant disables cost the full chain: by rps and by CPU per request."""
    out: dict[str, Any] = {}
    for mode, rows in results["throughput"].items():
        full = rows["nexgate"]
        for key, row in rows.items():
            if not key.startswith("variant:"):
                continue
            out.setdefault(key.removeprefix("variant:"), {})[mode] = {
                "rps_without": row["rps"], "rps_with": full["rps"],
                "rps_cost": round(1 - full["rps"] / row["rps"], 3),
                "cpu_us_per_req_without": row["server_cpu_us_per_req"],
                "cpu_us_per_req_with": full["server_cpu_us_per_req"],
                "cpu_cost": round(1 - row["server_cpu_us_per_req"] / full["server_cpu_us_per_req"], 3),
            }
    return out


def checks(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("json", "stream"):
        tp = results["throughput"][mode]
        lat = results["latency"][mode]
        ratio = tp["nexgate"]["rps"] / tp["bare"]["rps"]
        added = (lat["nexgate"]["latency_us"]["p50"] - lat["upstream"]["latency_us"]["p50"]) / 1000
        added_vs_bare = (lat["nexgate"]["latency_us"]["p50"] - lat["bare"]["latency_us"]["p50"]) / 1000
        out[mode] = {
            "rps_ratio_vs_bare": round(ratio, 3),
            "rps_ratio_ok": ratio >= TARGET_RPS_RATIO,
            "added_median_ms_vs_upstream": round(added, 3),
            "added_median_ok": added < TARGET_ADDED_MEDIAN_MS,
            "added_median_ms_vs_bare": round(added_vs_bare, 3),
            "added_cpu_us_per_req_vs_bare": round(tp["nexgate"]["server_cpu_us_per_req"]
                                                  - tp["bare"]["server_cpu_us_per_req"], 1),
            # Cross-check that other load on the machine barely disturbs: a saturated core serves
            # 1 / (CPU per request) requests a second, so this is the rps ratio a quiet machine gives.
            "cpu_capacity_ratio_vs_bare": round(tp["bare"]["server_cpu_us_per_req"]
                                                / tp["nexgate"]["server_cpu_us_per_req"], 3),
        }
    return out


def gateway_metrics_total(stack: Stack) -> float | None:
    """Requests NexGate's metrics plugin recorded: proof the whole chain ran for each request."""
    from harness import http_request

    try:
        status, _, data = http_request(stack.gateway.port, "GET", "/metrics", headers=stack.gateway_headers)
    except OSError:
        return None
    if status != 200:
        return None
    total = 0.0
    for line in data.decode().splitlines():
        if line.startswith("nexgate_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def print_report(results: dict[str, Any], chk: dict[str, Any], meta: dict[str, Any]) -> None:
    names = {"upstream": "upstream direct", "bare": "bare aiohttp proxy", "nexgate": "NexGate", "litellm": "LiteLLM"}
    tp, lat = results["throughput"], results["latency"]
    c = meta["settings"]["connections"]
    print()
    st = meta["settings"]
    print(f"Throughput: {c} connections, {st['duration_s']:g} s per target after {st['warmup_s']:g} s warmup  |  "
          f"latency: 1 connection, {st['latency_duration_s']:g} s per target after {st['latency_warmup_s']:g} s "
          f"warmup  |  each in {st['rounds']} interleaved rounds")
    print(f"NexGate source: {meta['source']}")
    print(f"Pinning: {meta['pinning']}; idle spinners: {'on' if st['idle_spinners'] else 'off'}")
    header = (f"{'':<20}{'mode':<8}{'rps @c' + str(c):>11}{'vs bare':>9}{'CPU us/req':>12}{'load core':>11}"
              f"{'p99@c' + str(c):>9}{'p50 ms':>9}{'p99 ms':>9}{'p50 +ms':>9}")
    print()
    print(header)
    print("-" * len(header))
    for mode in ("json", "stream"):
        bare_rps = tp[mode]["bare"]["rps"]
        up_p50 = lat[mode]["upstream"]["latency_us"]["p50"]
        for key in [k for k in names if k in lat[mode]]:
            t, l = tp[mode][key], lat[mode][key]
            vs = f"{t['rps'] / bare_rps:.0%}" if key != "upstream" else "-"
            load = f"{t['load_core_util']:.0%}" if "load_core_util" in t else "-"
            added = f"{(l['latency_us']['p50'] - up_p50) / 1000:+.3f}" if key != "upstream" else "-"
            print(f"{names[key]:<20}{mode:<8}{t['rps']:>11.0f}{vs:>9}{t['server_cpu_us_per_req']:>12.1f}"
                  f"{load:>11}{t['latency_us']['p99'] / 1000:>9.1f}"
                  f"{l['latency_us']['p50'] / 1000:>9.3f}{l['latency_us']['p99'] / 1000:>9.3f}{added:>9}")
        for key, t in tp[mode].items():
            if key.startswith(("variant:", "workers:")):
                name = "NexGate " + key.replace("variant:", "").replace("workers:", "workers=")
                print(f"{name[:19]:<20}{mode:<8}{t['rps']:>11.0f}{t['rps'] / bare_rps:>9.0%}"
                      f"{t['server_cpu_us_per_req']:>12.1f}{t['load_core_util']:>11.0%}"
                      f"{t['latency_us']['p99'] / 1000:>9.1f}{'-':>9}{'-':>9}{'-':>9}")
        print()
    print(f"rps, CPU us/req, load core and p99@c{c} (ms) come from the {c}-connection runs; p50/p99 ms from the "
          "1-connection runs.\n"
          "CPU us/req: CPU time of the server under test per request at full load (upstream rows: the fake "
          "upstream's own).\nload core: CPU use of the core shared by wrk and the fake upstream "
          "(well below 100% = the load side is not the bottleneck).\np50 +ms: median latency added over "
          "calling the fake upstream directly.")
    print()
    if meta["rounds_retried"]:
        print(f"{meta['rounds_retried']} round(s) disturbed by other processes were measured again.")
    if meta["foreign_cpu_util_max"] > FOREIGN_WARN:
        print(f"!! Other processes on this machine used up to {meta['foreign_cpu_util_max']:.0%} of a core during "
              "some kept rounds: the rps figures are disturbed (CPU us/req much less so); run again on a "
              "quiet machine.\n")
    for label, modes in meta.get("variant_costs", {}).items():
        for mode, v in modes.items():
            print(f"[cost] {mode}: NexGate {label}: {v['rps_without']:.0f} rps, full chain {v['rps_with']:.0f} rps: "
                  f"the disabled part costs {v['rps_cost']:.0%} of throughput ({v['cpu_cost']:.0%} by CPU per "
                  f"request: {v['cpu_us_per_req_with'] - v['cpu_us_per_req_without']:+.1f} us)")
    for mode in ("json", "stream"):
        k = chk[mode]
        label = "non-streaming" if mode == "json" else "streaming"
        ok1 = "PASS" if k["rps_ratio_ok"] else "FAIL"
        ok2 = "PASS" if k["added_median_ok"] else "FAIL"
        print(f"[{ok1}] {label}: NexGate rps = {k['rps_ratio_vs_bare']:.0%} of bare proxy "
              f"(target >= {TARGET_RPS_RATIO:.0%}); by CPU per request: {k['cpu_capacity_ratio_vs_bare']:.0%}")
        print(f"[{ok2}] {label}: NexGate adds {k['added_median_ms_vs_upstream']:.3f} ms at the median over the "
              f"upstream direct (target < {TARGET_ADDED_MEDIAN_MS:g} ms); "
              f"{k['added_median_ms_vs_bare']:+.3f} ms vs the bare proxy; "
              f"{k['added_cpu_us_per_req_vs_bare']:+.1f} CPU us/req vs the bare proxy")


def metadata_block(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    try:
        from nexgate_proxy.plugins import DEFAULT_PLUGINS
    except ImportError:
        DEFAULT_PLUGINS = ()
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "-"
    if stack.pinned:
        pinning = (f"server under test (bare proxy / NexGate) on core {stack.sut_core}; fake upstream + wrk on core "
                   f"{stack.load_core}; for the 'upstream direct' rows the fake upstream moves to core "
                   f"{stack.sut_core}"
                   + (f"; local PostgreSQL/Redis ({len(stack.service_pids)} processes) on core {stack.load_core}"
                      if stack.service_pids else ""))
        if stack.workers:
            pinning += ("; NexGate --workers rows: " + (f"every worker on every core (--workers-spread), wrk and the "
                        f"fake upstream still on core {stack.load_core}" if stack.workers[0][1].core is None
                        else f"every worker on core {stack.sut_core}"))
    else:
        pinning = "none (--no-pin or fewer than 2 cores)"
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": commit,
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "versions": {d: version(d) for d in ("nexgate", "aiohttp", "uvloop", "pluggy", "multidict", "yarl")},
        "wrk": wrk_version(),
        "litellm": litellm_version(stack.litellm.cmd[0]) if stack.litellm else None,
        "storage": "postgresql" if os.environ.get("NEXGATE_BENCH_STORAGE_URL", "").startswith("postgres") else "sqlite",
        "state": "redis" if os.environ.get("NEXGATE_BENCH_STATE_URL", "").startswith("redis") else "memory",
        "nexgate_plugins": list(DEFAULT_PLUGINS),
        "pinning": pinning,
        "settings": {"connections": args.connections, "duration_s": args.duration, "warmup_s": args.warmup,
                     "latency_duration_s": args.latency_duration, "latency_warmup_s": args.latency_warmup,
                     "rounds": args.rounds, "wrk_threads": 1, "idle_spinners": stack.spin},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="NexGate load benchmark (see benchmarks/README.md)")
    parser.add_argument("--connections", type=int, default=32, help="concurrency of the throughput runs (32)")
    parser.add_argument("--duration", type=float, default=10, help="seconds measured per throughput run (10)")
    parser.add_argument("--warmup", type=float, default=2, help="warmup seconds before each run (2)")
    parser.add_argument("--latency-duration", type=float, default=5, help="seconds per 1-connection run (5)")
    parser.add_argument("--latency-warmup", type=float, default=1, help="warmup before each latency run (1)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="split each measurement into this many interleaved rounds (5)")
    parser.add_argument("--quick", action="store_true", help="short runs (3 s / 3 s, 1 s warmup) for a smoke test")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--no-spin", action="store_true",
                        help="do not run the SCHED_IDLE spinners that keep idle vCPUs from halting")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "latest.json", help="where to write results")
    parser.add_argument("--retry-budget", type=float, default=45,
                        help="seconds a run may spend re-measuring rounds disturbed by other processes (45)")
    parser.add_argument("--rev", help="benchmark NexGate as committed at this git revision (e.g. HEAD) "
                                      "instead of the work tree")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="LABEL=PLUGINS",
                        help="also run NexGate with these built-ins disabled and report what they cost, e.g. "
                             "--variant 'without credits=credits' (repeatable)")
    parser.add_argument("--litellm", metavar="PATH",
                        help="also measure LiteLLM's proxy, this `litellm` executable (its own venv; or set "
                             "NEXGATE_BENCH_LITELLM); see benchmarks/litellm_target.py for its settings")
    parser.add_argument("--workers", type=int, action="append", default=[], metavar="N",
                        help="also measure NexGate serving with --workers N (repeatable; N > 1 needs "
                             "NEXGATE_BENCH_STATE_URL=redis://...); CPU per request sums every worker")
    parser.add_argument("--workers-spread", action="store_true",
                        help="let the --workers rows use every core (default: the server core only, so wrk and "
                             "the fake upstream keep a core of their own)")
    args = parser.parse_args()
    litellm = litellm_executable(args.litellm)
    if any(n > 1 for n in args.workers) and not os.environ.get("NEXGATE_BENCH_STATE_URL", "").startswith("redis"):
        parser.error("--workers N > 1 needs shared state: set NEXGATE_BENCH_STATE_URL=redis://127.0.0.1:6379/<db> "
                     "(nexgate serve refuses memory:// with several workers)")
    RETRY_BUDGET.seconds = args.retry_budget
    if args.quick:
        args.duration, args.warmup, args.latency_duration, args.latency_warmup, args.rounds = 3, 1, 3, 1, 3
    wrk_path()  # fail early with the install hint
    source = use_source(args.rev)

    started = time.perf_counter()
    services = [os.environ.get(name, "") for name in ("NEXGATE_BENCH_STORAGE_URL", "NEXGATE_BENCH_STATE_URL")]
    stack = Stack(pin=not args.no_pin, spin=not args.no_spin, variants=args.variant, services=services,
                  litellm=litellm, workers=args.workers, workers_spread=args.workers_spread)
    print(f"Starting fake upstream, bare proxy and NexGate in {stack.tmp} ...", flush=True)
    with stack:
        meta = metadata_block(stack, args)
        meta["source"] = source
        print(f"Pinning: {meta['pinning']}", flush=True)
        results = run_all(stack, args)
        recorded = gateway_metrics_total(stack)
    chk = checks(results)
    meta["nexgate_requests_recorded"] = recorded
    meta["rounds_retried"] = RETRY_BUDGET.rounds
    meta["foreign_cpu_util_max"] = max(row["foreign_cpu_util_max"] for ph in results.values()
                                       for mode in ph.values() for row in mode.values())
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["variant_costs"] = variant_costs(results)
    print_report(results, chk, meta)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, **results, "checks": chk,
                                     "targets": {"rps_ratio_vs_bare": TARGET_RPS_RATIO,
                                                 "added_median_ms_vs_upstream": TARGET_ADDED_MEDIAN_MS}},
                                    indent=2) + "\n")
    print(f"\nResults written to {args.json} (run took {meta['elapsed_s']} s; "
          f"NexGate recorded {recorded:.0f} requests in its metrics)" if recorded is not None else
          f"\nResults written to {args.json} (run took {meta['elapsed_s']} s)")
    ok = all(chk[m]["rps_ratio_ok"] and chk[m]["added_median_ok"] for m in chk)
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
