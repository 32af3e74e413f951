"""Shared plumbing for run.py and profile_gateway.py: processes, pinning, wrk, CPU accounting.

Every process started here is bounded: it runs under ``timeout`` (killed after
its lifetime even if this script dies), gets SIGTERM when this script exits
(PR_SET_PDEATHSIG), and is stopped by ``Stack.close``. Everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import atexit
import ctypes
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
LUA = HERE / "wrk_post.lua"
HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
LIFETIME_S = 600
"""Hard upper bound on the life of every server this harness starts."""

REQUEST_BODY: dict[str, Any] = {
    "model": "bench-model",
    "messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Say hello in one short sentence, then stop. This request is a benchmark."},
    ],
    "temperature": 0.2,
    "max_tokens": 64,
}
"""A typical small chat request (about 250 bytes)."""

WRK_INSTALL_HINT = (
    "wrk is not installed. Install it with:  sudo apt-get update && sudo apt-get install -y wrk\n"
    "(Debian/Ubuntu package 'wrk'; on macOS: brew install wrk)"
)

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def request_body(stream: bool) -> bytes:
    body = dict(REQUEST_BODY)
    if stream:
        # A usage-aware client: NexGate then forwards the body unchanged (no re-encode).
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cores_available() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _set_pdeathsig() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process, all its threads."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def descendant_pids(pid: int) -> list[int]:
    """Every live descendant of a process (forked workers, their helpers), from /proc/PID/task/*/children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants: a supervisor and its workers count as one server."""
    return proc_cpu_seconds(pid) + sum(proc_cpu_seconds(child) for child in descendant_pids(pid))


def raise_open_files(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE (inherited by every server it starts) to ``wanted``; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            try:  # root may raise the hard limit too (up to /proc/sys/fs/nr_open)
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
                return wanted
            except (ValueError, OSError):
                wanted = hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of a process: {tid: (thread name, seconds)}."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.index(b"(") + 1:raw.rindex(b")")].decode(errors="replace")
        fields = raw.rsplit(b")", 1)[1].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait), from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def repin(pid: int, core: int | None) -> None:
    """Move every thread of a running process to one core (taskset -a -p)."""
    if core is None:
        return
    subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], check=True, stdout=subprocess.DEVNULL)


def local_service_pids(urls: Sequence[str]) -> list[int]:
    """The local PostgreSQL / Redis server processes behind these URLs (none for remote hosts or SQLite)."""
    from urllib.parse import urlsplit

    names = set()
    for url in urls:
        parts = urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            continue
        if parts.scheme.startswith("postgres"):
            names.add("postgres")
        elif parts.scheme.startswith("redis"):
            names.add("redis-server")
    pids = []
    for name in sorted(names):
        found = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
        pids += [int(pid) for pid in found]
    return pids


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    core: int | None
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None
    pid: int = 0
    """The server's own pid (the child of ``timeout``)."""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        pin = ["taskset", "-c", str(self.core)] if self.core is not None else []
        full = ["timeout", "-k", "5", str(LIFETIME_S), *pin, *self.cmd]
        self._log = open(self.log, "wb")
        self.popen = subprocess.Popen(full, stdout=self._log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **self.env}, cwd=self.cwd, preexec_fn=_set_pdeathsig)
        # `timeout` forks the command: find the real server pid to read its CPU time.
        deadline = time.monotonic() + 5
        children = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children")
        while time.monotonic() < deadline:
            try:
                pids = children.read_text().split()
            except OSError:
                pids = []
            if pids:
                self.pid = int(pids[0])
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"{self.name} did not start: see {self.log}\n{self.log.read_text()[-2000:]}")

    def wait_ready(self, path: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}: see {self.log}\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                status, _, _ = http_request(self.port, "GET", path, timeout=1.0)
                if status == 200:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s ({last!r}); see {self.log}")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)  # with --workers N: the supervisor and every worker

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self.popen.kill()  # kills `timeout`; its -k and PDEATHSIG finish the child
                self.popen.wait(timeout=5)
        self._log.close()


def http_request(port: int, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (http.client: no proxy from the environment, ever)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})} if body is not None else dict(headers or {})
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def check_chat(port: int, stream: bool, headers: dict[str, str] | None = None) -> dict[str, str]:
    """Send one chat completion and verify the answer is the fake upstream's; return the response headers."""
    status, hdrs, data = http_request(port, "POST", PATH, request_body(stream), headers)
    if status != 200:
        raise RuntimeError(f"port {port}: HTTP {status}: {data[:500]!r}")
    if stream:
        events = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: ")]
        usage = [json.loads(e).get("usage") for e in events[:-1]] if events else []
        if not events or events[-1] != b"[DONE]" or not any(u and u.get("prompt_tokens") == 21 for u in usage):
            raise RuntimeError(f"port {port}: unexpected stream: {data[:500]!r}")
    else:
        answer = json.loads(data)
        if answer.get("usage", {}).get("total_tokens") != 33:
            raise RuntimeError(f"port {port}: unexpected body: {data[:500]!r}")
    return hdrs


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        sys.exit(WRK_INSTALL_HINT)
    return path


def wrk_version() -> str:
    out = subprocess.run([wrk_path(), "-v"], capture_output=True, text=True)
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def run_wrk(port: int, connections: int, duration: float, body_file: Path, headers: dict[str, str],
            core: int | None) -> dict[str, Any]:
    """Run wrk against PATH; return its BENCH_JSON result plus wrk's own CPU seconds."""
    pin = ["taskset", "-c", str(core)] if core is not None else []
    cmd = [*pin, wrk_path(), "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "5s",
           "-s", str(LUA), f"http://{HOST}:{port}{PATH}", "--", str(body_file),
           *[f"{k}: {v}" for k, v in headers.items()]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((l for l in out.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-1500:]}\n{out.stderr[-1500:]}")
    result = json.loads(line[len("BENCH_JSON "):])
    result["wrk_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


SPINNER = """
import os, sys, time
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for _ in range(10000):
        pass
"""


class Stack:
    """The fake upstream, the bare proxy and NexGate, each pinned, in one temp dir."""

    def __init__(self, *, pin: bool, spin: bool = True, with_bare: bool = True, with_gateway: bool = True,
                 variants: Sequence[tuple[str, list[str]]] = (), services: Sequence[str] = (),
                 litellm: str | None = None, workers: Sequence[int] = (), workers_spread: bool = False) -> None:
        cores = cores_available()
        self.pinned = pin and len(cores) >= 2
        self.spin = spin
        self.spinners: list[Server] = []
        # Server under test on the first core; fake upstream and wrk share the second.
        self.sut_core = cores[0] if self.pinned else None
        self.load_core = cores[1] if self.pinned else None
        self.tmp = Path(tempfile.mkdtemp(prefix="nexgate-bench-"))
        py = sys.executable
        up_port = free_port()
        self.upstream = Server("fake upstream", [py, str(HERE / "fake_upstream.py"), "--port", str(up_port)],
                               up_port, self.load_core, self.tmp / "upstream.log")
        self.servers = [self.upstream]
        self.bare: Server | None = None
        self.gateway: Server | None = None
        self.gateway_headers: dict[str, str] = {}
        self.service_urls = tuple(services)
        """The gateway's PostgreSQL / Redis URLs: local servers are part of the stack (see start)."""
        self.service_pids: list[int] = []
        self.variants: list[tuple[str, Server]] = []
        """(label, NexGate with some built-ins disabled): measured beside the full chain."""
        self.workers: list[tuple[int, Server]] = []
        """(N, NexGate serving with --workers N): measured beside the full chain."""
        self.litellm: Server | None = None
        self._headers: dict[str, dict[str, str]] = {}
        if with_bare:
            port = free_port()
            self.bare = Server("bare proxy", [py, str(HERE / "bare_proxy.py"), "--port", str(port),
                                              "--upstream", self.upstream.url],
                               port, self.sut_core, self.tmp / "bare.log")
            self.servers.append(self.bare)
        if with_gateway:
            sys.path.insert(0, str(HERE))
            from gateway_config import gateway_setup, write_gateway_config

            port = free_port()
            try:
                setup = gateway_setup(self.upstream.url, port, self.tmp)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            self.config_path = write_gateway_config(setup, self.tmp / "nexgate-bench.yaml")
            self.gateway_headers = dict(setup.headers)
            self.gateway = Server("NexGate", [*nexgate_command(), "--log-level", "WARNING", "serve",
                                              "--config", str(self.config_path)],
                                  port, self.sut_core, self.tmp / "nexgate.log", env=setup.env,
                                  cwd=self.tmp)  # relative paths of any plugin land in the temp dir
            self.servers.append(self.gateway)
            self._headers[self.gateway.name] = self.gateway_headers
            for index, (label, disable) in enumerate(variants):
                self.variants.append((label, self._variant(index, label, disable, gateway_setup,
                                                           write_gateway_config)))
            for count in workers:
                # Spread: the workers may run on every core (wrk and the upstream stay on the load core).
                core = None if workers_spread else self.sut_core
                self.workers.append((count, self._variant(f"w{count}", f"workers={count}", [], gateway_setup,
                                                          write_gateway_config, workers=count, core=core)))
        if litellm:
            from litellm_target import litellm_setup

            port = free_port()
            cmd, headers, env = litellm_setup(litellm, self.upstream.url, port, self.tmp)
            self.litellm = Server("LiteLLM", cmd, port, self.sut_core, self.tmp / "litellm.log", env=env, cwd=self.tmp)
            self.servers.append(self.litellm)
            self._headers[self.litellm.name] = headers
        self.body_files = {}
        for stream in (False, True):
            f = self.tmp / f"body-{'stream' if stream else 'json'}.json"
            f.write_bytes(request_body(stream))
            self.body_files[stream] = f

    def _variant(self, index: int | str, label: str, disable: list[str], gateway_setup: Any,
                 write_gateway_config: Any, workers: int = 1, core: int | None | str = "sut") -> Server:
        """Another NexGate, in a directory of its own (its own SQLite file, outbox and account)."""
        workdir = self.tmp / f"variant-{index}"
        workdir.mkdir()
        port = free_port()
        setup = gateway_setup(self.upstream.url, port, workdir, disable=disable)
        setup.config["server"]["workers"] = workers
        config_path = write_gateway_config(setup, workdir / "nexgate-bench.yaml")
        server = Server(f"NexGate {label}", [*nexgate_command(), "--log-level", "WARNING", "serve",
                                             "--config", str(config_path), "--workers", str(workers)],
                        port, self.sut_core if core == "sut" else core, workdir / "nexgate.log", env=setup.env,
                        cwd=workdir)
        self.servers.append(server)
        self._headers[server.name] = dict(setup.headers)
        return server

    def headers_for(self, server: Server) -> dict[str, str]:
        """The headers every request to ``server`` carries (a NexGate's API key; none for the others)."""
        return self._headers.get(server.name, {})

    def _pin_services(self) -> None:
        """Local PostgreSQL and Redis serve NexGate: they run on the load core, not the measured one, and
        their CPU is the benchmark's own (a round is not 'disturbed' by them)."""
        self.service_pids = local_service_pids(self.service_urls)
        if not self.pinned:
            return
        for pid in self.service_pids:
            subprocess.run(["taskset", "-a", "-p", "-c", str(self.load_core), str(pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _unpin_services(self) -> None:
        every = ",".join(str(c) for c in cores_available())
        for pid in self.service_pids:
            subprocess.run(["taskset", "-a", "-p", "-c", every, str(pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    def start(self) -> None:
        if self.spin:
            # One SCHED_IDLE busy loop per core: it only ever runs when the core would otherwise idle,
            # which keeps the vCPU from halting. See README "Idle spinners" for why.
            for core in cores_available():
                spinner = Server(f"spinner {core}", [sys.executable, "-c", SPINNER, str(LIFETIME_S)], 0, core,
                                 self.tmp / f"spinner-{core}.log")
                spinner.start()
                self.spinners.append(spinner)
        for s in self.servers:
            s.start()
        self.upstream.wait_ready("/health")
        if self.bare:
            # No GET route on the bare proxy: wait for its port, then check a real request below.
            _wait_port(self.bare.port, 15, self.bare)
        for gateway in self.gateways():
            gateway.wait_ready("/healthz", timeout=30)
        if self.litellm:
            self.litellm.wait_ready("/health/liveliness", timeout=120)  # it imports for ~10-20 s
        # Correctness first: every path returns the fake upstream's answer, streamed or not.
        for stream in (False, True):
            check_chat(self.upstream.port, stream)
            if self.bare:
                check_chat(self.bare.port, stream)
            for gateway in self.gateways():
                hdrs = check_chat(gateway.port, stream, self.headers_for(gateway))
                if "x-nexgate-request-id" not in hdrs:
                    raise RuntimeError(f"{gateway.name}'s answer lacks x-nexgate-request-id: is it NexGate?")
            if self.litellm:
                try:
                    check_chat(self.litellm.port, stream, self.headers_for(self.litellm))
                except (RuntimeError, OSError) as exc:
                    raise RuntimeError(f"LiteLLM does not answer a {'stream' if stream else 'json'} chat "
                                       f"completion correctly: {exc}\n(log: {self.litellm.log})\n"
                                       f"{self.litellm.log.read_text(errors='replace')[-2000:]}") from None
        self._pin_services()  # after the gateways connected: their PostgreSQL backends exist now

    def gateways(self) -> list[Server]:
        """Every NexGate of the run: the full chain, its variants, its --workers rows."""
        return [s for s in [self.gateway, *(v for _, v in self.variants), *(w for _, w in self.workers)] if s]

    def own_cpu_seconds(self) -> float:
        """CPU time of every long-running process of this benchmark (servers, spinners, local services)."""
        return (sum(s.cpu_seconds() for s in self.servers + self.spinners)
                + sum(proc_cpu_seconds(pid) for pid in self.service_pids))

    def close(self) -> None:
        self._unpin_services()
        for s in reversed(self.servers + self.spinners):
            try:
                s.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: stopping {s.name}: {exc!r}", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_port(port: int, timeout: float, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.popen is not None and server.popen.poll() is not None:
            raise RuntimeError(f"{server.name} exited: {server.log.read_text()[-2000:]}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{server.name} did not open port {port}")


def use_source(rev: str | None) -> str:
    """Make NexGate import from git revision ``rev`` (exported to a temp dir) instead of the work tree.

    Affects this process (sys.path) and every process it starts (PYTHONPATH). Returns a description
    of the source benchmarked, for the results.
    """
    repo = HERE.parent
    if rev is None:
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "nexgate_proxy", "plugins"],
                               capture_output=True, text=True).stdout.strip()
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "-"
        return f"work tree at {head}" + (" with uncommitted changes" if dirty else "")
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    dest = Path(tempfile.mkdtemp(prefix="nexgate-bench-src-"))
    atexit.register(shutil.rmtree, dest, True)
    src, pkgs = dest / "src", dest / "pkgs"
    src.mkdir()
    pkgs.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", sha], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    (pkgs / "nexgate_proxy").symlink_to(src / "nexgate_proxy")
    (pkgs / "nexgate_plugins").symlink_to(src / "plugins")  # as pyproject.toml's package-dir maps it
    sys.path.insert(0, str(pkgs))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pkgs), os.environ.get("PYTHONPATH")]))
    return f"git {rev} ({sha})"


def nexgate_command() -> list[str]:
    """`nexgate` from the same venv as this Python, else `python -m nexgate_proxy.cli`."""
    exe = Path(sys.executable).with_name("nexgate")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "nexgate_proxy.cli"]
