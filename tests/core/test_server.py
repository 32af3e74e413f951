"""`nexgate serve` as a real process: the demo through the official SDK, graceful shutdown, workers.

Every process is started in its own session and its whole process group is
killed at teardown, so a failing test never leaves a gateway (or a worker) behind.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import openai
import pytest

from nexgate_proxy.testing import free_port, is_listening, require_redis

STARTUP_TIMEOUT = 15.0


_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, dict]:
    try:
        with _no_proxy.open(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@dataclass
class Gateway:
    """A running ``nexgate serve`` process."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"nexgate exited with {self.proc.returncode} before answering:\n{self.log()}")
            try:
                if get(f"{self.url}/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail(f"nexgate did not answer /healthz within {timeout}s:\n{self.log()}")

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM, then the exit code; fails the test if it takes longer than ``timeout``."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"nexgate still running {timeout}s after SIGTERM:\n{self.log()}")


def start_gateway(args: list[str], cwd: Path, port: int | None = None) -> Gateway:
    port = free_port() if port is None else port
    log_path = cwd / f"nexgate-{port}.log"
    env = {k: v for k, v in os.environ.items() if k != "NEXGATE_CONFIG"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nexgate_proxy.cli", "serve", *args, "--port", str(port)],
                                cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Gateway(proc, port, log_path)


def kill_group(gateway: Gateway) -> None:
    # The process group holds the supervisor and every worker it forked, even orphaned ones.
    try:
        os.killpg(gateway.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        gateway.proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


Launch = Callable[..., Gateway]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """``launch("--demo")`` starts ``nexgate serve --demo --port <free>`` in tmp_path."""
    started: list[Gateway] = []

    def _launch(*args: str, port: int | None = None) -> Gateway:
        gateway = start_gateway(list(args), tmp_path, port)
        started.append(gateway)
        return gateway

    yield _launch
    for gateway in started:
        kill_group(gateway)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(["--demo"], tmp_path_factory.mktemp("demo"))
    try:
        gateway.wait_healthy()
        yield gateway
    finally:
        kill_group(gateway)


def demo_key(demo: Gateway) -> str:
    """The API key the demo printed for this run."""
    match = re.search(r"Demo API key \(this run only\): (ngk_\S+)", demo.log())
    assert match, demo.log()
    return match.group(1)


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def echo_config(tmp_path: Path, chunk_delay_ms: int = 0, extra: str = "", state: str = "memory://") -> Path:
    return write_config(tmp_path / "nexgate.yaml", f"""
        state: {{url: "{state}"}}
        providers:
          echo:
            type: echo
            options: {{chunk_delay_ms: {chunk_delay_ms}}}
        models:
          echo-chat:
            route: [{{provider: echo, model: echo-1}}]
            free: true
        auth: {{required: false}}  # these tests are about the server, not about keys
        {extra}
    """)


def sse_text(body: bytes) -> str:
    """The assistant text carried by a chat.completions event stream."""
    text = ""
    for line in body.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


# ------------------------------------------------------- the demo, via the SDK


@pytest.fixture
def client(demo: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{demo.url}/v1", api_key=demo_key(demo), max_retries=0, timeout=10) as c:
        yield c


def test_demo_banner_curl_works(demo: Gateway) -> None:
    banner = demo.log()
    assert "NexGate demo: an offline echo provider" in banner
    key = demo_key(demo)
    assert f"Try: curl http://127.0.0.1:{demo.port}/v1/chat/completions -H 'Authorization: Bearer {key}'" in banner
    # What the banner's curl sends.
    request = urllib.request.Request(
        f"{demo.url}/v1/chat/completions", method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        data=json.dumps({"model": "demo", "messages": [{"role": "user", "content": "Hello"}]}).encode())
    with _no_proxy.open(request, timeout=5) as response:
        assert response.status == 200
        assert json.loads(response.read())["choices"][0]["message"]["content"] == "Echo: Hello"


def test_demo_chat_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="demo", messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hello, gateway"}])
    assert completion.choices[0].message.content == "Echo: Hello, gateway"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_demo_streaming_chat(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream these words please"}], stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == "Echo: stream these words please"
    assert len(deltas) == 5  # word by word: really streamed, not one blob
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_demo_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="text-embedding-demo", input=["alpha", "beta", "alpha"])
    vectors = [e.embedding for e in result.data]
    assert [e.index for e in result.data] == [0, 1, 2]
    assert all(len(v) == 8 and all(-1 <= x <= 1 for x in v) for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]  # deterministic per text
    assert len(client.embeddings.create(model="text-embedding-demo", input="x", dimensions=4).data[0].embedding) == 4


def test_demo_models(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == ["claude-demo", "demo", "gpt-4o-mini", "text-embedding-demo"]
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-5-ultra", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"


def test_health_and_readiness(demo: Gateway) -> None:
    assert get(f"{demo.url}/healthz") == (200, {"status": "ok"})
    status, body = get(f"{demo.url}/readyz")
    assert status == 200 and body["status"] == "ok"
    assert all(body["checks"].values())


# ---------------------------------------------------------------- shutdown


def test_sigterm_stops_the_gateway(launch: Launch) -> None:
    gateway = launch("--demo")
    gateway.wait_healthy()
    assert gateway.terminate(timeout=5) == 0, gateway.log()
    assert not is_listening(gateway.port)
    assert "shutting down" in gateway.log()


def test_sigterm_lets_an_inflight_stream_finish(launch: Launch, tmp_path: Path) -> None:
    words = [f"word{i}" for i in range(10)]  # ~13 chunks, 100 ms apart: the stream lasts ~1.3 s
    gateway = launch("--config", str(echo_config(tmp_path, chunk_delay_ms=100)))
    gateway.wait_healthy()
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": "echo-chat", "stream": True, "messages": [{"role": "user", "content": " ".join(words)}]}),
            {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        first = response.readline()
        assert first.startswith(b"data: {")

        gateway.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The listening socket closes at once; the gateway lives on to finish the stream.
        while is_listening(gateway.port):
            assert time.monotonic() - signalled < 2, "still accepting connections 2s after SIGTERM"
            time.sleep(0.02)
        assert gateway.proc.poll() is None, "exited without waiting for the stream"

        rest = response.read()
        finished = time.monotonic()
    finally:
        conn.close()
    body = first + rest
    assert body.endswith(b"data: [DONE]\n\n")
    assert sse_text(body) == "Echo: " + " ".join(words)
    assert finished - signalled > 0.5, "the stream was not in flight across the SIGTERM"
    assert gateway.proc.wait(5) == 0, gateway.log()


# ----------------------------------------------------------------- workers


def children_of(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # the process ended (a replaced worker, a short-lived child) while we looked
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def tcp_sockets(port: int) -> list[tuple[str, int, str]]:
    """(state, remote port, inode) of every IPv4 TCP socket whose local port is ``port``."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if int(local.split(":")[1], 16) == port:
            out.append((state, int(remote.split(":")[1], 16), inode))
    return out


LISTEN, ESTABLISHED = "0A", "01"


def listening_workers(supervisor: int, port: int) -> set[int]:
    listeners = {inode for state, _, inode in tcp_sockets(port) if state == LISTEN}
    return {pid for pid in children_of(supervisor) if socket_inodes(pid) & listeners}


def wait_for_workers(gateway: Gateway, count: int, exclude: set[int] = frozenset()) -> set[int]:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        workers = listening_workers(gateway.proc.pid, gateway.port) - exclude
        if len(workers) >= count:
            return workers
        assert gateway.proc.poll() is None, gateway.log()
        time.sleep(0.05)
    pytest.fail(f"{count} workers not listening within {STARTUP_TIMEOUT}s:\n{gateway.log()}")


def chat_over_new_connection(port: int, text: str) -> tuple[http.client.HTTPConnection, int]:
    """One chat request on a fresh keep-alive connection; the connection and its client port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/chat/completions",
                 json.dumps({"model": "echo-chat", "messages": [{"role": "user", "content": text}]}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 200, body
    assert body["choices"][0]["message"]["content"] == f"Echo: {text}"
    return conn, conn.sock.getsockname()[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads connection owners from /proc")
def test_workers_share_the_port_and_stop_together(launch: Launch, tmp_path: Path) -> None:
    gateway = launch("--config", str(echo_config(tmp_path, state=require_redis())), "--workers", "2")
    gateway.wait_healthy()
    workers = wait_for_workers(gateway, 2)
    assert len(workers) == 2

    # Which process holds the server end of each client connection: the kernel knows.
    connections = [chat_over_new_connection(gateway.port, f"request {i}") for i in range(16)]
    try:
        owner = {inode: pid for pid in workers for inode in socket_inodes(pid)}
        served_by = {remote: owner.get(inode) for state, remote, inode in tcp_sockets(gateway.port)
                     if state == ESTABLISHED}
        pids = [served_by.get(client_port) for _, client_port in connections]
        assert None not in pids, f"connections not held by a worker: {pids}"
        assert set(pids) == workers, f"all 16 connections served by one worker: {pids}"

        # A worker that dies is replaced; the others keep serving meanwhile.
        dead = pids[0]
        os.kill(dead, signal.SIGKILL)
        [replacement] = wait_for_workers(gateway, 1, exclude=workers)
        chat_over_new_connection(gateway.port, "after a crash")[0].close()

        everyone = (workers - {dead}) | {replacement}
        assert gateway.terminate(timeout=10) == 0, gateway.log()
    finally:
        for conn, _ in connections:
            conn.close()
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() for pid in everyone) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in everyone), "a worker outlived the supervisor"
    assert not is_listening(gateway.port)


def test_sigterm_during_worker_startup_stops_promptly(launch: Launch, tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slow_start.py").write_text(textwrap.dedent("""
        import asyncio
        from nexgate_proxy import hookimpl

        @hookimpl
        async def nexgate_startup(app, config):
            await asyncio.sleep(3)  # e.g. a database that is slow to connect
    """))
    gateway = launch("--config", str(echo_config(tmp_path, extra=f"plugins: {{directory: '{plugins}'}}",
                                                 state=require_redis())), "--workers", "2")
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while "started 2 workers" not in gateway.log():
        assert time.monotonic() < deadline and gateway.proc.poll() is None, gateway.log()
        time.sleep(0.02)
    started = time.monotonic()
    assert gateway.terminate(timeout=8) == 0, gateway.log()
    assert time.monotonic() - started < 3, "waited for the workers to finish starting"
    assert "listening on" not in gateway.log()
    assert not is_listening(gateway.port)


@pytest.mark.parametrize(("state", "port", "message"), [
    ("redis", "0", "--workers > 1 needs a fixed --port"),
    ("memory://", "18999", "--workers > 1 needs shared state"),
])
def test_workers_need_a_fixed_port_and_shared_state(tmp_path: Path, state: str, port: str, message: str) -> None:
    state_url = require_redis() if state == "redis" else state
    result = subprocess.run(
        [sys.executable, "-m", "nexgate_proxy.cli", "serve", "--config", str(echo_config(tmp_path, state=state_url)),
         "--workers", "2", "--port", port],
        cwd=tmp_path, capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert message in result.stderr
    assert "listening" not in result.stderr


def test_the_collector_is_tuned_and_frozen_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    """server.gc_thresholds reaches gc.set_threshold, and what startup built is frozen out of every pass."""
    import gc

    from nexgate_proxy.config import ServerConfig, parse_config
    from nexgate_proxy.server import settle_collector

    assert ServerConfig().gc_thresholds == (700, 10, 1000)
    config = parse_config({"server": {"gc_thresholds": [5000, 20, 50]}}, "test")
    assert config.server.gc_thresholds == (5000, 20, 50)
    with pytest.raises(Exception, match="server.gc_thresholds"):
        parse_config({"server": {"gc_thresholds": [700, -1]}}, "test")
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        settle_collector(config.server.gc_thresholds)
        assert gc.get_threshold() == (5000, 20, 50)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_serve_applies_the_collector_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from nexgate_proxy import server
    from nexgate_proxy.app import build_app
    from nexgate_proxy.config import parse_config

    applied: list[tuple[int, int, int]] = []
    monkeypatch.setattr(server, "settle_collector", applied.append)
    config = parse_config({"server": {"gc_thresholds": [800, 10, 400]},
                           "storage": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
                           "usage": {"outbox_dir": str(tmp_path / "outbox")}}, "test")

    async def serve_briefly() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, stop.set)
        await server.serve_app(build_app(config), config, "127.0.0.1", free_port(), reuse_port=False, stop=stop)

    asyncio.run(serve_briefly())
    assert applied == [(800, 10, 400)]
