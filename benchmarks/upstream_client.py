#!/usr/bin/env python
"""CPU per request of the upstream client alone: an aiohttp.ClientSession vs nexgate_proxy.upstream.

Both send the benchmark's chat request to ``fake_upstream.py`` (its own process) at concurrency 8
and read the answer (JSON, or the SSE stream chunk by chunk) the way the gateway does; the figure
is this process's CPU time (``time.process_time``) per request, interleaved rounds. No gateway,
no hooks: what the client layer itself costs.

    .venv/bin/python benchmarks/upstream_client.py            # about 30 seconds
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import free_port  # noqa: E402

HERE = Path(__file__).resolve().parent
HEADERS = {"content-type": "application/json", "user-agent": "OpenAI/Python 1.0", "x-stainless-lang": "python"}


async def measure(url: str, requests: int, rounds: int) -> None:
    from nexgate_proxy.upstream import UpstreamPool

    for stream in (False, True):
        body = b'{"model":"m","stream":%s,"messages":[{"role":"user","content":"hi"}]}' % (
            b"true" if stream else b"false")
        # The session as nexgate_proxy.app built it.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, ttl_dns_cache=300, enable_cleanup_closed=True),
            trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        pool = UpstreamPool(1000)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)

        async def via_session() -> None:
            resp = await session.post(url, data=body, headers=dict(HEADERS), timeout=timeout, allow_redirects=False)
            if stream:
                async for _ in resp.content.iter_any():
                    pass
            else:
                await resp.read()
            resp.close()

        async def via_pool() -> None:
            answer = await pool.request(url, body, dict(HEADERS), 10.0)
            if stream:
                async for _ in answer.iter_chunks():
                    pass
            else:
                await answer.read(1 << 26)
            answer.close()

        figures: dict[str, list[float]] = {"session": [], "pool": []}
        for _ in range(rounds):
            for name, call in (("session", via_session), ("pool", via_pool)):
                todo = iter(range(requests))

                async def worker() -> None:
                    for _ in todo:
                        await call()

                started = time.process_time()
                await asyncio.gather(*[worker() for _ in range(8)])
                figures[name].append((time.process_time() - started) / requests * 1e6)
        for name, values in figures.items():
            print(f"{'stream' if stream else 'json':6s} {name:8s} {min(values):6.1f} CPU us/request "
                  f"(rounds {min(values):.1f}..{max(values):.1f})", flush=True)
        await session.close()
        await pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    upstream = subprocess.Popen([sys.executable, str(HERE / "fake_upstream.py"), "--port", str(port),
                                 "--max-seconds", "300"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        import uvloop

        uvloop.run(measure(f"http://127.0.0.1:{port}/v1/chat/completions", args.requests, args.rounds))
    finally:
        upstream.terminate()
        upstream.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
