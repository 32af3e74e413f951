"""The proxy path: one client request through the hook chain to an upstream and back.

Kept deliberately lean: no database, no bcrypt, no blocking call. The body is
parsed once; it is re-encoded only when the upstream needs a different one
(another model name, usage requested in a stream, client-only keys removed).
Streams are relayed event by event as they arrive. A target whose provider
speaks the other dialect (OpenAI <-> Anthropic) gets a translated body and its
answer is translated back, per attempt (nexgate_proxy.translate); the
same-dialect path never enters that package.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import random
import re
from dataclasses import replace
from time import perf_counter
from typing import TYPE_CHECKING, Any, AsyncIterator

import aiohttp
from aiohttp import web

from .clientip import client_ip
from .context import RequestContext
from .cooldown import Cooldowns, TargetHealth, retry_after_seconds
from .endpoints import ENDPOINTS
from .errors import GatewayError
from .headers import request_headers, response_headers
from .money import format_usd
from .providers.base import BodyTooLarge, ProviderBusy
from .requestbody import read_body
from .runner import watch_connection
from .targetstats import TargetStats
from .translate import translatable, translation_for
from .usage import StreamMeter, add_cost, estimate_output_tokens, usage_from_body, with_cost
from .watchdog import Watchdog, current_task

if TYPE_CHECKING:
    from .config import Config, Target
    from .endpoints import Endpoint
    from .plugins import HookChain
    from .providers.base import Provider, UpstreamResponse
    from .translate import StreamTranslator, Translation

log = logging.getLogger("nexgate.proxy")

# Body keys that would let a client pick the upstream; never forwarded, never used.
CLIENT_ONLY_KEYS = frozenset({"api_base", "base_url", "api_key", "api_version", "organization"})
# Never forwarded: those, and the gateway's own request fields (``models``: the client's fallbacks).
NOT_FORWARDED = CLIENT_ONLY_KEYS | {"models"}

# Write errors that mean the client went away.
_CLIENT_GONE = (ConnectionResetError, ConnectionError, aiohttp.ClientConnectionResetError)

_UPSTREAM_TRANSPORT = (aiohttp.ClientError, OSError)

_ENDPOINT_BY_NAME = {e.name: e for e in ENDPOINTS}


_ID_PREFIX = f"req_{os.urandom(8).hex()}"
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique across processes (a random 64-bit prefix per process) and cheap: no syscall per request."""
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


class Proxy:
    def __init__(self, config: Config, chain: HookChain, providers: dict[str, Provider]) -> None:
        self.config = config
        self.chain = chain
        self.providers = providers
        self.session: aiohttp.ClientSession | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        """Set at startup; cached because get_running_loop() costs a getpid() per call."""
        self.health: TargetHealth = Cooldowns()
        """The targets' circuit breakers (nexgate_proxy.cooldown): a target cooling down is skipped."""
        self.stats = TargetStats()
        """Latency, rpm/tpm counts, retries and fallbacks per target (nexgate_proxy.targetstats)."""
        self.max_response_bytes = config.upstream.max_response_bytes
        self.max_body_bytes = config.server.max_body_bytes
        self.trusted_proxies = config.server.trusted_proxies
        # sock_connect bounds opening a connection. No `connect`: it also covers taking a pooled
        # connection, and aiohttp would arm a timer per request for it; the first-byte timer
        # around the whole send already bounds that wait.
        self._client_timeouts: dict[str, aiohttp.ClientTimeout] = {
            alias: aiohttp.ClientTimeout(total=None, sock_connect=route.timeouts.connect)
            for alias, route in config.models.items()
        }

    # ------------------------------------------------------------ entry

    async def handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        ctx = RequestContext(
            request_id=new_request_id(),
            endpoint=endpoint.name,
            api_format=endpoint.api_format,
            request=request,
            app=request.app,
            client_ip=client_ip(request.remote, request.headers.get("X-Forwarded-For") if self.trusted_proxies else None,
                                self.trusted_proxies),
        )
        try:
            await self.chain.authenticate(ctx)
            raw = await read_body(request, self.max_body_bytes)
            body = self._parse_body(ctx, endpoint, raw)
            await self.chain.admit(ctx)
            ctx.targets = await self.chain.route(ctx)
            if not endpoint.billed:  # no price, so no hold and no charge (count_tokens, moderations)
                ctx.targets = [replace(t, price=None) for t in ctx.targets]
            await self.chain.reserve(ctx)
            return await self._forward(ctx, endpoint, raw, body)
        except GatewayError as exc:
            ctx.status = exc.status
            ctx.error_code = exc.code
            return self._error_response(ctx, exc)
        except asyncio.CancelledError:
            if not ctx.client_disconnected:
                raise  # a shutdown's, not ours
            task = asyncio.current_task()
            while task is not None and task.uncancel():
                pass
            ctx.status = 499
            ctx.error_code = "client_disconnected"
            return web.Response(status=499)  # nobody reads it
        except Exception:
            # A bug, not the client's fault. Log the type and where, never the request data.
            ctx.status = 500
            ctx.error_code = "internal_error"
            log.error("internal error on %s", ctx.request_id, exc_info=True)
            return self._error_response(ctx, GatewayError(500, "The gateway failed to handle the request.",
                                                          code="internal_error"))
        finally:
            await self._finish(ctx)

    async def _finish(self, ctx: RequestContext) -> None:
        """Run settle, guard and record once.

        For an answer the client receives, this runs before its last byte goes out, so the
        charge and the usage record are durable before the client can act on the answer.
        That ordering is also why no shield (a task per request) is needed: aiohttp cancels a
        handler only when a shutdown's grace period runs out, and a handler cancelled here has
        not delivered its answer; the holds it leaves expire on their own.
        """
        if not ctx.finished:
            ctx.finished = True
            watch_connection(ctx.request, None)  # from here on a hang-up shows as a failed write
            await self.chain.finish(ctx)
            target = ctx.target
            if target is not None and target.tpm is not None and ctx.attempts and self.loop is not None:
                usage = ctx.usage  # settle filled in estimates where the upstream reported none
                self.stats.took((target.provider, target.model), self.loop.time(),
                                usage.prompt_tokens + usage.completion_tokens)

    def _error_response(self, ctx: RequestContext, exc: GatewayError) -> web.Response:
        resp = exc.response()
        if ctx.api_format == "anthropic":
            # Anthropic's SDKs look for a top-level "type": "error"; the OpenAI shape stays intact.
            resp.body = json.dumps({"type": "error", **exc.body()}).encode()
        resp.headers.update(ctx.response_headers)
        resp.headers["x-nexgate-request-id"] = ctx.request_id
        if ctx.attempts:  # every target failed: how many were called
            resp.headers["x-nexgate-attempts"] = str(ctx.attempts)
        return resp

    # ----------------------------------------------------------- request

    def _parse_body(self, ctx: RequestContext, endpoint: Endpoint, raw: bytes) -> dict[str, Any]:
        if not raw:
            raise GatewayError(400, "The request body is empty; send a JSON object.", code="invalid_json")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise GatewayError(
                400, "We could not parse the JSON body of your request. Send valid JSON "
                "with Content-Type: application/json.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
        model = body.get("model")
        if model is None or model == "":
            raise GatewayError(400, "You must provide a model parameter.", code="missing_required_parameter",
                               param="model")
        if not isinstance(model, str):
            raise GatewayError(400, "The model parameter must be a string.", code="invalid_type", param="model")
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise GatewayError(400, "The stream parameter must be true or false.", code="invalid_type",
                               param="stream")
        ctx.body = body
        ctx.body_size = len(raw)
        ctx.model = model
        ctx.stream = bool(stream) and endpoint.streams
        return body

    def _upstream_body(self, ctx: RequestContext, endpoint: Endpoint, raw: bytes, body: dict[str, Any],
                       target: Target) -> tuple[bytes, bool]:
        """The bytes to send upstream, and whether NexGate added usage the client did not ask for."""
        model_changed = target.model != ctx.model
        inject = False
        if ctx.stream and endpoint.include_usage_option:
            options = body.get("stream_options")
            inject = not (isinstance(options, dict) and options.get("include_usage") is True)
        stripped = not NOT_FORWARDED.isdisjoint(body)
        if not (model_changed or inject or stripped):
            return raw, False
        if not stripped:
            patched = _patch_raw(raw, ctx.model or "", target.model if model_changed else None, inject)
            if patched is not None:
                return patched, inject
        body = {k: v for k, v in body.items() if k not in NOT_FORWARDED}
        body["model"] = target.model
        if inject:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return json.dumps(body).encode(), inject

    # ---------------------------------------------------------- upstream

    async def _forward(self, ctx: RequestContext, endpoint: Endpoint, raw: bytes,
                       body: dict[str, Any]) -> web.StreamResponse:
        route = ctx.route
        assert route is not None, "the route hook must set ctx.route"
        timeouts = route.timeouts
        retry = route.retry
        loop = self.loop or asyncio.get_running_loop()
        deadline = loop.time() + timeouts.total
        watchdog = Watchdog(loop, deadline, min(timeouts.first_byte, timeouts.idle))
        forwarded = request_headers(ctx.headers)
        forwarded["x-request-id"] = ctx.request_id
        failure: GatewayError | None = None
        failed_on = ""
        health = self.health
        stats = self.stats
        cooling_until: float | None = None
        capped_until: float | None = None
        last = len(ctx.targets) - 1

        self._watch_client(ctx)
        try:
            for index, target in enumerate(ctx.targets):
                if ctx.attempts >= retry.max_attempts:
                    break
                key = (target.provider, target.model)
                if health.cooling and not health.available(key, loop.time()):  # a breaker is open somewhere
                    until = health.reopens_at(key)
                    cooling_until = until if cooling_until is None else min(cooling_until, until)
                    continue
                if target.rpm is not None or target.tpm is not None:
                    free_at = stats.capped_until(target, key, loop.time())
                    if free_at is not None:
                        capped_until = free_at if capped_until is None else min(capped_until, free_at)
                        continue
                provider = self.providers[target.provider]
                ctx.target = target
                translation = None
                sent_to = endpoint
                if endpoint.api_format in provider.api_formats or not translatable(endpoint.name, provider.api_formats):
                    payload, injected = self._upstream_body(ctx, endpoint, raw, body, target)
                else:
                    try:
                        translation, sent_to, payload = self._translated_body(ctx, endpoint, body, provider, target)
                    except GatewayError as exc:  # this target cannot take the request; a later one may
                        failure, failed_on = self._kept(ctx, failure, failed_on, exc, target)
                        continue
                    injected = False
                tries = 0
                while True:
                    ctx.attempts += 1
                    if target.rpm is not None or target.tpm is not None:
                        stats.called(key, loop.time())
                    retry_left = tries < retry.retries and ctx.attempts < retry.max_attempts
                    try:
                        response = await self._attempt(ctx, target, provider, sent_to, payload, forwarded,
                                                       watchdog, injected, translation, index == last, retry_left)
                    except _Failed as failed:
                        failure, failed_on = self._kept(ctx, failure, failed_on, failed.error, target, failed.status)
                        if not (failed.retriable and retry_left):
                            break
                        # Capped exponential backoff with jitter, never past the request's deadline, and
                        # not into a breaker the failure just opened.
                        delay = min(retry.backoff * 2 ** tries, retry.max_backoff) * random.uniform(0.5, 1.0)
                        now = loop.time()
                        if now + delay >= deadline or health.is_open(key, now):
                            break
                        tries += 1
                        stats.retries[key] = stats.retries.get(key, 0) + 1
                        await asyncio.sleep(delay)
                        continue
                    if index:
                        stats.fallbacks[target.alias] = stats.fallbacks.get(target.alias, 0) + 1
                    return response
        finally:
            watchdog.close()
            if ctx.attempt_started and ctx.target is not None:  # an attempt that ended otherwise
                self._attempt_done(ctx, ctx.target, 0,
                                   "client_disconnected" if ctx.client_disconnected else "upstream_error")
        if ctx.attempts == 0 and (cooling_until is not None or capped_until is not None):
            raise _all_skipped(cooling_until, capped_until, loop.time())
        assert failure is not None
        raise failure

    def _kept(self, ctx: RequestContext, failure: GatewayError | None, failed_on: str, error: GatewayError,
              target: Target, status: int = 0) -> tuple[GatewayError, str]:
        """The failure to report so far: the most meaningful wins, whatever the (weighted, random)
        order of the targets. (A method, not a closure: no cells per request.)"""
        if ctx.attempt_started:  # observability: the attempt's time and outcome
            self._attempt_done(ctx, target, status, error.code)
        if failure is None or _more_meaningful(error, target.provider, failure, failed_on):
            return error, target.provider
        return failure, failed_on

    async def _attempt(self, ctx: RequestContext, target: Target, provider: Provider, sent_to: Endpoint,
                       payload: bytes, forwarded: dict[str, str], watchdog: Watchdog, injected: bool,
                       translation: Translation | None, last_target: bool,
                       retry_left: bool) -> web.StreamResponse:
        """One call to one target: the relayed answer, or ``_Failed`` when nothing reached the client."""
        assert ctx.route is not None
        timeouts = ctx.route.timeouts
        loop = self.loop or asyncio.get_running_loop()
        health = self.health
        key = (target.provider, target.model)
        sent_at = loop.time()
        headers = dict(forwarded)
        if self.chain.attempt_hooks:
            self.chain.upstream_attempt(ctx, target, headers)  # observability: trace context
        ctx.attempt_started = perf_counter()
        watchdog.expect(timeouts.first_byte)
        try:
            with watchdog:
                upstream = await provider.send(ctx, target, sent_to, payload, headers,
                                               self._session(), self._client_timeouts[ctx.route.alias])
        except ProviderBusy as exc:  # its max_concurrent is reached: another target may have room
            raise _Failed(exc, retriable=False) from None
        except TimeoutError:
            health.failed(key, loop.time(), target.cooldown)
            raise _Failed(GatewayError(504, f"The upstream provider '{target.provider}' did not answer in time.",
                                       code="upstream_timeout")) from None
        except _UPSTREAM_TRANSPORT as exc:
            health.failed(key, loop.time(), target.cooldown)
            log.warning("upstream %s unreachable for %s: %s", target.provider, ctx.request_id, type(exc).__name__)
            raise _Failed(GatewayError(502, f"The upstream provider '{target.provider}' could not be reached.",
                                       code="upstream_unreachable")) from None
        del headers  # sent: not kept while the answer streams
        status = upstream.status
        now = loop.time()
        if status >= 500 or status == 429:
            retry_after = retry_after_seconds(upstream.headers) if status in (429, 503) else None
            health.failed(key, now, target.cooldown, retry_after)
            # The last target's 429 is relayed as sent when it will not be called again.
            if not (status == 429 and last_target and (not retry_left or health.is_open(key, now))):
                upstream.close()
                raise _Failed(_upstream_status_error(target, status), status=status)
        elif status in (401, 403):
            upstream.close()
            raise _Failed(_upstream_status_error(target, status), retriable=False, status=status)
        else:
            self.stats.answered(key, now - sent_at)
        streamed = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        # Nothing reaches the client before the upstream's first bytes (a stream's) or its whole
        # answer (a non-streamed one): one that breaks or stalls after its headers, before
        # that, falls back like a refused connection.
        chunks = upstream.iter_chunks().__aiter__() if streamed else None
        try:
            if chunks is not None:
                answer = await self._first_chunk(upstream, chunks, watchdog, timeouts.idle)
            else:
                answer = await self._read_answer(upstream, watchdog, timeouts.idle)
        except _AnswerBroken as exc:
            health.failed(key, loop.time(), target.cooldown)
            raise _Failed(exc.error(target), status=status) from None
        if status != 429:  # the provider answered: its breaker closes (a 4xx is the request's fault)
            health.succeeded(key, loop.time())
        self._attempt_done(ctx, target, status, None, streamed=chunks is not None)
        if chunks is not None:
            return await self._relay_stream(ctx, upstream, answer, chunks, injected, watchdog,
                                            timeouts.idle, translation)
        return await self._relay_body(ctx, upstream, answer, translation)

    def _attempt_done(self, ctx: RequestContext, target: Target, status: int, error_code: str | None,
                      streamed: bool = False) -> None:
        """Observability: the attempt's wait counts as upstream time; plugins hear how it ended."""
        now = perf_counter()
        ctx.upstream_wait += now - ctx.attempt_started
        if streamed:
            ctx.first_chunk_at = now
        self.chain.upstream_done(ctx, target, status, error_code)
        ctx.attempt_started = 0.0

    def _watch_client(self, ctx: RequestContext) -> None:
        """A client that hangs up while the upstream works cancels the request at once (see handle)."""
        task = current_task(self.loop) if self.loop is not None else asyncio.current_task()

        def lost() -> None:
            ctx.client_disconnected = True
            if task is not None:
                task.cancel()

        if not watch_connection(ctx.request, lost):
            ctx.client_disconnected = True
            raise GatewayError(499, "The client closed the connection.", code="client_disconnected")

    @staticmethod
    def _translated_body(ctx: RequestContext, endpoint: Endpoint, body: dict[str, Any], provider: Provider,
                         target: Target) -> tuple[Translation, Endpoint, bytes]:
        """The seam to nexgate_proxy.translate: the target's provider speaks the other dialect."""
        clean = {k: v for k, v in body.items() if k not in NOT_FORWARDED}
        translation = translation_for(endpoint.name, provider.api_formats, clean)
        if translation is None:
            raise GatewayError(400, f"The model `{ctx.model}` cannot serve {endpoint.path}.",
                               code="unsupported_endpoint", param="model")
        assert ctx.route is not None
        payload = translation.request(target, ctx.route)
        return translation, _ENDPOINT_BY_NAME[translation.upstream_endpoint], payload

    def _session(self) -> aiohttp.ClientSession:
        assert self.session is not None, "the upstream session is created at startup"
        return self.session

    # ------------------------------------------------------------- relay

    def _served_headers(self, ctx: RequestContext, upstream: UpstreamResponse) -> dict[str, str]:
        headers = response_headers(upstream.headers)
        headers["x-nexgate-request-id"] = ctx.request_id
        target = ctx.target
        assert target is not None
        # Served by: the alias whose route held the target (a fallback's when one served); names only.
        headers["x-nexgate-model"] = target.alias or (ctx.model or "")
        headers["x-nexgate-provider"] = target.provider
        headers["x-nexgate-attempts"] = str(ctx.attempts)
        return headers

    async def _read_answer(self, upstream: UpstreamResponse, watchdog: Watchdog, idle: float) -> bytes:
        watchdog.expect(idle)
        try:
            with watchdog:
                return await upstream.read(self.max_response_bytes)
        except TimeoutError:
            raise _AnswerBroken("stalled") from None
        except BodyTooLarge:
            raise GatewayError(502, "The upstream answer exceeded the gateway's size limit.",
                               code="upstream_response_too_large") from None
        except _UPSTREAM_TRANSPORT:
            raise _AnswerBroken("cut") from None
        finally:
            upstream.close()

    @staticmethod
    async def _first_chunk(upstream: UpstreamResponse, chunks: AsyncIterator[bytes], watchdog: Watchdog,
                           idle: float) -> bytes:
        """A stream's first bytes (b"" if it ended at once); the client is not answered before them."""
        watchdog.expect(idle)
        try:
            with watchdog:
                return await anext(chunks, b"")
        except TimeoutError:
            upstream.close()
            raise _AnswerBroken("stalled") from None
        except _UPSTREAM_TRANSPORT:
            upstream.close()
            raise _AnswerBroken("cut") from None
        except asyncio.CancelledError:  # the client went away
            upstream.close()
            raise

    async def _relay_body(self, ctx: RequestContext, upstream: UpstreamResponse, body: bytes,
                          translation: Translation | None) -> web.Response:
        loop = self.loop or asyncio.get_running_loop()
        ctx.status = upstream.status
        headers = self._served_headers(ctx, upstream)
        ctx.first_byte_at = loop.time()
        usage_end = -1
        if upstream.status < 400:
            usage_end = usage_from_body(ctx.usage, body)  # the served model's own usage, before any translation
            if not ctx.usage.reported and ctx.endpoint != "embeddings":
                ctx.usage.completion_tokens = estimate_output_tokens(body)  # marked estimated: not reported
        if translation is not None:
            body = translation.response(body) if upstream.status < 400 else translation.error(upstream.status, body)
            headers["Content-Type"] = "application/json"  # even when the upstream's error page was not JSON
        await self._finish(ctx)
        headers.update(ctx.response_headers)  # settle may have added some (e.g. the charged cost)
        if usage_end != -1 and ctx.actual_cost_pico is not None and translation is None and ctx.api_format == "openai":
            cost = format_usd(ctx.actual_cost_pico)  # OpenRouter's usage.cost: what the client was charged
            body = with_cost(body, usage_end, cost) if usage_end >= 0 else add_cost(body, cost)
        return web.Response(status=upstream.status, body=body, headers=headers)

    async def _relay_stream(self, ctx: RequestContext, upstream: UpstreamResponse, first: bytes,
                            chunks: AsyncIterator[bytes], injected_usage: bool, watchdog: Watchdog, idle: float,
                            translation: Translation | None) -> web.StreamResponse:
        loop = self.loop or asyncio.get_running_loop()
        if first:
            ctx.first_byte_at = loop.time()
        ctx.status = upstream.status
        headers = self._served_headers(ctx, upstream)
        headers.update(ctx.response_headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        del headers  # copied into the response; the frame lives as long as the stream (~0.5 KB each)
        # A client that asked for usage gets its chunk held back until settle, to carry usage.cost.
        cost_chunk = (translation is None and not injected_usage and ctx.api_format == "openai"
                      and _ENDPOINT_BY_NAME[ctx.endpoint].include_usage_option)
        meter: StreamMeter | StreamTranslator = StreamMeter(ctx.usage, strip_usage_chunk=injected_usage,
                                                            hold_usage_chunk=cost_chunk)
        if translation is not None:  # reads usage from the upstream's events, hands on the client's dialect
            meter = translation.meter(meter)
        try:
            await response.prepare(ctx.request)
        except _CLIENT_GONE:
            upstream.close()
            ctx.client_disconnected = True
            ctx.status = 499
            return response
        except asyncio.CancelledError:  # the client went away (see _watch_client)
            upstream.close()
            raise
        error: GatewayError | None = None
        client_gone = False
        watchdog.expect(idle)
        try:
            with watchdog:
                chunk = first
                while chunk:  # iter_any never yields b"": that is the end
                    out = meter.feed(chunk)
                    if out:
                        try:
                            await response.write(out)
                        except _CLIENT_GONE:
                            client_gone = True
                            break
                    watchdog.expect(idle)
                    waited = perf_counter()  # observability: time waiting on the upstream
                    chunk = await anext(chunks, b"")
                    ctx.upstream_wait += perf_counter() - waited
        except TimeoutError:
            error = GatewayError(504, "The upstream provider stopped sending the stream.", code="upstream_timeout")
        except _UPSTREAM_TRANSPORT:
            error = _stream_broken()
        finally:
            upstream.close()
        if not client_gone:
            # The held final event (and a last one without its blank line) go out after settle.
            tail = meter.finish() if error is None else b""
            if error is None:
                await self._finish(ctx)
                if cost_chunk and ctx.actual_cost_pico is not None:
                    tail = add_cost(tail, format_usd(ctx.actual_cost_pico))
            if error is not None:
                ctx.error_code = error.code
                tail += _stream_error_event(ctx, error)
            try:
                await response.write_eof(tail)  # the last bytes and the end of the body in one send
            except _CLIENT_GONE:
                client_gone = True
        if client_gone:
            ctx.client_disconnected = True
            ctx.status = 499
            ctx.error_code = "client_disconnected"
            return response
        return response


_MODEL_KEY = b'"model"'
_COLON = re.compile(rb"\s*:\s*")
_USAGE_OPTION = b',"stream_options":{"include_usage":true}}'


def _patch_raw(raw: bytes, alias: str, new_model: str | None, inject_usage: bool) -> bytes | None:
    """Edit the client's bytes in place of re-encoding the whole body, when that is safe.

    Swaps the model's value when ``"model"`` occurs exactly once and holds the alias as
    json.dumps writes it; appends the usage option when the body has no stream_options.
    None means "re-encode instead".
    """
    if new_model is not None:
        if raw.count(_MODEL_KEY) != 1:
            return None
        colon = _COLON.match(raw, raw.index(_MODEL_KEY) + len(_MODEL_KEY))
        if colon is None:
            return None
        start = colon.end()
        old_value = json.dumps(alias).encode()
        if not raw.startswith(old_value, start):
            return None
        raw = raw[:start] + json.dumps(new_model).encode() + raw[start + len(old_value):]
    if inject_usage:
        if b'"stream_options"' in raw:
            return None
        body = raw.rstrip()
        if not body.endswith(b"}"):
            return None
        raw = body[:-1] + _USAGE_OPTION
    return raw


def _upstream_status_error(target: Target, status: int) -> GatewayError:
    if status == 429:  # only when a later target was tried too; the last target's 429 is relayed as sent
        return GatewayError(429, f"The upstream provider '{target.provider}' is rate limited.",
                            code="upstream_rate_limited")
    if status in (401, 403):
        # The provider refused NexGate's own credentials: an operator problem, not the client's.
        return GatewayError(502, f"The upstream provider '{target.provider}' refused the gateway's credentials.",
                            code="upstream_auth_failed")
    return GatewayError(502, f"The upstream provider '{target.provider}' failed (HTTP {status}).",
                        code="upstream_error")


class _Failed(Exception):
    """A call that failed before anything reached the client; ``retriable`` on the same target."""

    def __init__(self, error: GatewayError, retriable: bool = True, status: int = 0) -> None:
        self.error = error
        self.retriable = retriable
        self.status = status
        """The upstream's HTTP status, 0 when none came (observability)."""


class _AnswerBroken(Exception):
    """A non-streamed answer broke ("cut") or went silent ("stalled") after its headers."""

    def __init__(self, how: str) -> None:
        self.how = how

    def error(self, target: Target) -> GatewayError:
        if self.how == "stalled":
            return GatewayError(504, f"The upstream provider '{target.provider}' stopped sending its answer.",
                                code="upstream_timeout")
        return GatewayError(502, f"The upstream connection to '{target.provider}' broke while sending the answer.",
                            code="upstream_interrupted")


# When every target failed, the client is told of the most meaningful failure: a provider that
# timed out or failed (5xx, broken answers) over one that throttled (429), over 4xx-like ones
# (the provider refusing NexGate's key, a target that cannot take the request); ties go to the
# provider first in name order, so the answer does not depend on the random order of the targets.
_FAILURE_RANK = {"upstream_timeout": 5, "upstream_error": 4, "upstream_interrupted": 4, "upstream_unreachable": 3,
                 "upstream_rate_limited": 2, "upstream_auth_failed": 1}


def _more_meaningful(error: GatewayError, provider: str, than: GatewayError, than_provider: str) -> bool:
    rank, other = _FAILURE_RANK.get(error.code or "", 0), _FAILURE_RANK.get(than.code or "", 0)
    return rank > other or (rank == other and provider < than_provider)


def _all_skipped(cooling_until: float | None, capped_until: float | None, now: float) -> GatewayError:
    """Every target of the request is cooling down or at its rpm/tpm cap: no provider is called."""
    soonest = min(t for t in (cooling_until, capped_until) if t is not None)
    wait = str(max(1, math.ceil(soonest - now)))
    if cooling_until is None:
        return GatewayError(429, f"Every upstream of this model is at its request or token cap; retry in {wait} s.",
                            code="all_targets_at_capacity", headers={"Retry-After": wait})
    return GatewayError(503, f"Every upstream of this model is cooling down after failures; retry in {wait} s.",
                        code="all_targets_cooling_down", headers={"Retry-After": wait})


def _stream_broken() -> GatewayError:
    return GatewayError(502, "The upstream connection broke in the middle of the stream.",
                        code="upstream_stream_interrupted")


def _stream_error_event(ctx: RequestContext, error: GatewayError) -> bytes:
    """An SSE error event the client's SDK raises on, in the client's dialect."""
    if ctx.api_format == "anthropic":
        payload = {"type": "error", "error": {"type": "api_error", "message": error.message}}
        return f"event: error\ndata: {json.dumps(payload)}\n\n".encode()
    return f"data: {json.dumps(error.body())}\n\n".encode()
