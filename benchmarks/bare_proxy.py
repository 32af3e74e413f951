"""The ceiling for any aiohttp gateway: a bare pass-through proxy, nothing else.

Reads the request body, POSTs it to the upstream with one shared
``aiohttp.ClientSession`` and returns the status and body. An SSE answer
(``text/event-stream``) is relayed chunk by chunk as it arrives. No parsing,
no header filtering, no hooks, no logging: what is left is the cost of aiohttp
server + aiohttp client on uvloop, which NexGate pays too.

Bounded: it exits after ``--max-seconds`` or when its parent process goes away.

    python benchmarks/bare_proxy.py --port 9002 --upstream http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import aiohttp
from aiohttp import web

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)
POOL: web.AppKey[int] = web.AppKey("pool", int)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(request.app[UPSTREAM] + "/v1/chat/completions", data=body,
                            headers={"Content-Type": "application/json"}) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            return web.Response(status=upstream.status, body=await upstream.read(),
                                headers={"Content-Type": content_type})
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": content_type})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application):
    connector = aiohttp.TCPConnector(limit=app[POOL], ttl_dns_cache=300)
    # The same session settings as NexGate's (no cookie jar), so the ceiling is a fair one.
    app[SESSION] = aiohttp.ClientSession(connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
    yield
    await app[SESSION].close()


async def serve(host: str, port: int, upstream: str, max_seconds: float, pool: int = 1000) -> None:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app[POOL] = pool
    app.router.add_post("/v1/chat/completions", chat)
    app.cleanup_ctx.append(session_ctx)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048)
    await site.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    deadline = loop.time() + max_seconds
    print(f"bare proxy listening on http://{host}:{port} -> {upstream}", flush=True)
    try:
        while not stop.is_set() and loop.time() < deadline and os.getppid() == parent:
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
    parser.add_argument("--upstream", default="http://127.0.0.1:9001")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="exit after this long (default 600)")
    parser.add_argument("--pool", type=int, default=1000,
                        help="upstream connections at most, as NexGate's upstream.max_connections (1000)")
    args = parser.parse_args()
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(serve(args.host, args.port, args.upstream, args.max_seconds, args.pool))


if __name__ == "__main__":
    main()
