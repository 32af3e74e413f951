#!/usr/bin/env python
"""Where does NexGate's per-request CPU time go, beyond the bare aiohttp proxy?

Starts the same stack as run.py (fake upstream, bare proxy, NexGate; same pinning),
puts each proxy under wrk load (32 connections) and samples it with py-spy
(``--gil``: only samples holding the GIL, i.e. the event loop's real work; an
idle executor thread waiting on its queue would otherwise count as busy).
Sample shares are turned into CPU microseconds per request with the process's
own CPU time over the same window, so the two proxies can be compared line by line.

    /work/venv/bin/pip install py-spy          # once
    /work/venv/bin/python benchmarks/profile_gateway.py            # about 1 minute
    /work/venv/bin/python benchmarks/profile_gateway.py --mode json --duration 15

Then counts system calls per request with ``strace -c`` (apt-get install strace).

Writes benchmarks/results/profile-{bare,nexgate}-{json,stream}.folded (collapsed
stacks: open them in https://www.speedscope.app or flamegraph.pl) and
benchmarks/results/profile.json (the tables printed here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import HERE, Server, Stack, run_wrk, thread_cpu_seconds, use_source  # noqa: E402

OURS = ("nexgate_proxy/", "plugins/", "nexgate_plugins/")


def py_spy() -> str:
    exe = Path(sys.executable).with_name("py-spy")
    if exe.exists():
        return str(exe)
    found = shutil.which("py-spy")
    if found is None:
        sys.exit("py-spy is not installed: /work/venv/bin/pip install py-spy")
    return found


def short_path(path: str) -> str:
    for ours in ("/nexgate_proxy/", "/nexgate_plugins/"):
        i = path.find(ours)
        if i >= 0:
            return path[i + 1:]
    repo = str(HERE.parent) + "/"
    if path.startswith(repo):
        return path[len(repo):]
    for marker in ("site-packages/", "/lib/python3."):
        i = path.find(marker)
        if i >= 0:
            rest = path[i + len(marker):]
            return rest.split("/", 1)[1] if marker == "/lib/python3." else rest
    return path


def parse_frame(frame: str) -> tuple[str, str]:
    """'name (path:line)' -> ('name', 'short/path.py:line')."""
    if frame.endswith(")") and " (" in frame:
        name, where = frame[:-1].rsplit(" (", 1)
        return name, short_path(where)
    return frame, ""


def component(where: str) -> str:
    path = where.split(":", 1)[0]
    if path.startswith("nexgate_proxy/"):
        return "nexgate_proxy"
    if path.startswith("plugins/") or path.startswith("nexgate_plugins/"):
        return "nexgate_plugins"
    top = path.split("/", 1)[0]
    if top.endswith(".py"):
        top = top[:-3]
    return top or "native"


def _is_other_thread(stack: str) -> bool:
    # py-spy roots a non-main thread's stacks at threading's bootstrap.
    return stack.startswith("Thread._bootstrap ") or stack.startswith("_bootstrap ")


def analyse(folded: Path, main_us: float, other_us: float) -> dict[str, Any]:
    """Tables in CPU us per request: main-thread samples scaled to the main thread's CPU per
    request, samples of other threads (store, executors) to theirs."""
    self_t: Counter[str] = Counter()
    incl_t: Counter[str] = Counter()
    comp_t: Counter[str] = Counter()
    ours_incl: Counter[str] = Counter()
    lines = [line.rpartition(" ") for line in folded.read_text().splitlines()]
    stacks = [(stack, int(count)) for stack, _, count in lines if stack]
    main_n = sum(c for st, c in stacks if not _is_other_thread(st))
    other_n = sum(c for st, c in stacks if _is_other_thread(st))
    if not main_n:
        return {"samples": 0}
    weight_main = main_us / main_n
    weight_other = other_us / other_n if other_n else 0.0
    for stack, count in stacks:
        w = count * (weight_other if _is_other_thread(stack) else weight_main)
        frames = [parse_frame(f) for f in stack.split(";")]
        name, where = frames[-1]
        self_t[f"{name} ({where})"] += w
        comp_t[component(where)] += w
        seen: set[str] = set()
        for n, wh in frames:
            key = f"{n} ({wh})"
            if key not in seen:
                seen.add(key)
                incl_t[key] += w
                if wh.startswith(OURS):
                    ours_incl[key] += w
    if other_us and not other_n:
        # Other threads burnt CPU without holding the GIL (e.g. SQLite's C code): no stack to show.
        comp_t["<other threads, outside the GIL>"] += other_us
    total = main_us + other_us

    def table(counter: Counter[str], n: int) -> list[dict[str, Any]]:
        return [{"function": k, "share": round(v / total, 4), "us_per_req": round(v, 1)}
                for k, v in counter.most_common(n)]

    return {
        "samples": main_n + other_n,
        "samples_other_threads": other_n,
        "cpu_us_per_req": round(total, 1),
        "main_thread_us_per_req": round(main_us, 1),
        "other_threads_us_per_req": round(other_us, 1),
        "by_component": table(comp_t, 30),
        "top_self": table(self_t, 40),
        "top_inclusive": table(incl_t, 60),
        "nexgate_inclusive": table(ours_incl, 60),
    }


def profile_one(stack: Stack, server: Server, stream: bool, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    headers = stack.gateway_headers if server is stack.gateway else {}
    body = stack.body_files[stream]
    run_wrk(server.port, args.connections, 2, body, headers, stack.load_core)  # warmup
    # CPU per request without the profiler attached: sample shares are scaled to this.
    threads0 = thread_cpu_seconds(server.pid)
    clean = run_wrk(server.port, args.connections, 4, body, headers, stack.load_core)
    threads1 = thread_cpu_seconds(server.pid)
    per_thread: Counter[str] = Counter()
    main_s = other_s = 0.0
    for tid, (name, seconds) in threads1.items():
        used = seconds - threads0.get(tid, (name, 0.0))[1]
        if tid == server.pid:
            main_s += used
        else:
            other_s += used
            per_thread[name] += used
    n = max(1, clean["requests"])
    result: dict[str, Any] = {}

    def load() -> None:
        result.update(run_wrk(server.port, args.connections, args.duration + 2, body, headers, stack.load_core))

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(1.0)
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    # py-spy runs on the load core so that its own work does not land on the measured core.
    cmd = ["taskset", "-c", str(stack.load_core)] if stack.load_core is not None else []
    cmd += [py_spy(), "record", "--pid", str(server.pid), "--rate", str(args.rate), "--duration",
            str(args.duration), "--format", "raw", "--function", "--gil", "--output", str(out)]
    if args.nonblocking:
        cmd.append("--nonblocking")
    spy = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 30)
    cpu, wall = server.cpu_seconds() - cpu0, time.perf_counter() - t0
    thread.join()
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {spy.stderr[-2000:]}")
    rps_during = result["requests"] / (result["duration_us"] / 1e6)
    # CPU per request while sampled: the process's CPU time over the requests it served meanwhile.
    profiled_us = cpu * 1e6 / max(1.0, rps_during * wall)
    analysis = analyse(out, main_s * 1e6 / n, other_s * 1e6 / n)
    analysis["other_threads"] = {k: round(v * 1e6 / n, 1) for k, v in per_thread.most_common() if v > 0}
    analysis.update({"rps_clean": round(clean["requests"] / (clean["duration_us"] / 1e6), 1),
                     "rps_while_profiled": round(rps_during, 1), "cpu_us_per_req_while_profiled": round(profiled_us, 1),
                     "cpu_util": round(cpu / wall, 3), "rate_hz": args.rate, "folded": str(out)})
    return analysis


def syscalls_per_request(stack: Stack, server: Server, stream: bool, seconds: int = 3) -> dict[str, float]:
    """System calls per request at 1 connection (keep-alive), counted by ``strace -c``."""
    headers = stack.gateway_headers if server is stack.gateway else {}
    body = stack.body_files[stream]
    out = stack.tmp / f"strace-{server.port}-{int(stream)}.txt"
    spy = subprocess.Popen(["strace", "-c", "-f", "-p", str(server.pid), "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # attached
        result = run_wrk(server.port, 1, seconds, body, headers, stack.load_core)
        time.sleep(0.3)
    finally:
        spy.terminate()
        spy.wait(timeout=10)
    calls: dict[str, float] = {}
    for line in out.read_text().splitlines():
        cols = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(cols) >= 5 and cols[3].isdigit() and cols[-1] != "total":
            calls[cols[-1]] = int(cols[3]) / max(1, result["requests"])
    calls = dict(sorted(((k, round(v, 2)) for k, v in calls.items() if v >= 0.01), key=lambda kv: -kv[1]))
    return {"total": round(sum(calls.values()), 1), **calls}


def print_comparison(mode: str, bare: dict[str, Any], gate: dict[str, Any], top: int) -> None:
    print(f"\n=== {mode}: CPU per request (unprofiled): bare proxy {bare['cpu_us_per_req']:.0f} us "
          f"({bare['rps_clean']:.0f} rps), NexGate {gate['cpu_us_per_req']:.0f} us ({gate['rps_clean']:.0f} rps); "
          f"while profiled {bare['cpu_us_per_req_while_profiled']:.0f} / {gate['cpu_us_per_req_while_profiled']:.0f} us; "
          f"{bare['samples']} / {gate['samples']} samples ===")
    for name, r in (("bare proxy", bare), ("NexGate", gate)):
        others = ", ".join(f"{k} {v:g}" for k, v in r.get("other_threads", {}).items()) or "none"
        print(f"  {name}: main thread {r['main_thread_us_per_req']:.0f} us/req; other threads "
              f"{r['other_threads_us_per_req']:.0f} us/req ({others}); {r['samples_other_threads']} of their samples")
    print("(us/req below: each thread's samples scaled to that thread's unprofiled CPU per request)")
    print("\nSelf time by component (us/req):     bare   NexGate   delta")
    b = {r["function"]: r["us_per_req"] for r in bare["by_component"]}
    g = {r["function"]: r["us_per_req"] for r in gate["by_component"]}
    for name in sorted(set(b) | set(g), key=lambda k: -(g.get(k, 0) - b.get(k, 0))):
        if max(b.get(name, 0), g.get(name, 0)) < 1:
            continue
        print(f"  {name:<32}{b.get(name, 0):>7.1f}{g.get(name, 0):>10.1f}{g.get(name, 0) - b.get(name, 0):>+8.1f}")
    print(f"\nNexGate code, inclusive (us/req, share of NexGate's CPU), top {top}:")
    # Leave out the frames every sample shares (main, serve, run_worker: the event loop's own callers).
    for r in [r for r in gate["nexgate_inclusive"] if r["us_per_req"] < 0.99 * gate["main_thread_us_per_req"]][:top]:
        print(f"  {r['us_per_req']:>7.1f}  {r['share']:>6.1%}  {r['function']}")
    print(f"\nNexGate hottest functions, self time (us/req), top {top}:")
    for r in gate["top_self"][:top]:
        print(f"  {r['us_per_req']:>7.1f}  {r['share']:>6.1%}  {r['function']}")


def main() -> int:
    parser = argparse.ArgumentParser(description="Profile NexGate vs the bare proxy under load with py-spy")
    parser.add_argument("--mode", choices=("json", "stream", "both"), default="both")
    parser.add_argument("--duration", type=int, default=10, help="seconds sampled per target (10)")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second (500)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-strace", dest="strace", action="store_false",
                        help="skip counting system calls per request with strace")
    parser.add_argument("--rev", help="profile NexGate as committed at this git revision (e.g. HEAD)")
    parser.add_argument("--nonblocking", action="store_true",
                        help="py-spy --nonblocking: less overhead, slightly less exact stacks")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--no-spin", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    py_spy()
    print(f"NexGate source: {use_source(args.rev)}")
    args.out.mkdir(parents=True, exist_ok=True)
    modes = ("json", "stream") if args.mode == "both" else (args.mode,)
    report: dict[str, Any] = defaultdict(dict)
    with Stack(pin=not args.no_pin, spin=not args.no_spin) as stack:
        assert stack.bare and stack.gateway
        for mode in modes:
            for key, server in (("bare", stack.bare), ("nexgate", stack.gateway)):
                print(f"profiling {server.name} ({mode}) for {args.duration} s ...", flush=True)
                report[mode][key] = profile_one(stack, server, mode == "stream", args,
                                                args.out / f"profile-{key}-{mode}.folded")
        if args.strace and shutil.which("strace"):
            for mode in modes:
                for key, server in (("bare", stack.bare), ("nexgate", stack.gateway)):
                    print(f"counting system calls of {server.name} ({mode}) ...", flush=True)
                    report[mode][key]["syscalls_per_req"] = syscalls_per_request(stack, server, mode == "stream")
        elif args.strace:
            print("strace not found (apt-get install strace): no system call counts")
    for mode in modes:
        print_comparison(mode, report[mode]["bare"], report[mode]["nexgate"], args.top)
        for key in ("bare", "nexgate"):
            sc = report[mode][key].get("syscalls_per_req")
            if sc:
                top = ", ".join(f"{k} {v:g}" for k, v in list(sc.items())[1:9])
                print(f"System calls per request ({key}, 1 connection): {sc['total']:g}: {top}")
    (args.out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWritten: {args.out / 'profile.json'} and the .folded stacks beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
