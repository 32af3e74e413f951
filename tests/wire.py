"""A scriptable local upstream for one provider's exact wire format.

Each route answers with a handler the test writes (JSON or SSE in that
provider's format) and every request is recorded as it arrived: path, query,
headers and body, so a test can assert what the provider would really receive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]


Answer = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


class Wire:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.routes: dict[str, Answer] = {}
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on(self, path: str, answer: Answer) -> None:
        self.routes[path] = answer

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(Seen(request.path, dict(request.query), dict(request.headers), body))
        answer = self.routes.get(request.path)
        if answer is None:
            return web.json_response({"error": {"message": f"no route {request.path}"}}, status=404)
        return await answer(request, body)

    async def __aenter__(self) -> Wire:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def json_answer(payload: Any, status: int = 200) -> Answer:
    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json")
    return answer


def sse_answer(events: list[Any]) -> Answer:
    """``data:`` events as OpenAI-style streams send them; a str is sent as is (e.g. "[DONE]")."""
    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
            await resp.write(f"data: {data}\n\n".encode())
        await resp.write_eof()
        return resp
    return answer
