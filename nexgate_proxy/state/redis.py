"""The one Redis client of a gateway process: a lean pipelined RESP connection with a circuit breaker.

The core opens one ``RedisClient`` per worker process (``services``, app key ``REDIS``) when
``state.url`` is Redis. Plugins that keep hot state there (rate limits, credit holds) register
their Lua scripts with it and run them through their ``RedisScripts``; the invalidation bus
publishes through it. Every call has a tight timeout; after a few consecutive failures of any of
them the one breaker opens and every call fails at once with ``StateUnavailable`` until the one
background probe sees Redis answer. Pub/sub needs a connection of its own (``open_resp`` with
``PushProtocol``), which the bus keeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import hiredis

from ..background import stop_tasks

log = logging.getLogger("nexgate.state")


class StateUnavailable(Exception):
    """The backend did not answer in time, or its circuit breaker is open."""

    def __init__(self, reason: str, *, sent: bool = True) -> None:
        super().__init__(reason)
        self.sent = sent
        """False only when the call surely never reached Redis (so it surely did nothing there)."""



class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; closed again by a successful probe."""

    def __init__(self, threshold: int = 3) -> None:
        self.threshold = threshold
        self.consecutive = 0
        self.open = False
        self.opened = 0
        """How many times it opened (for metrics)."""

    def success(self) -> None:
        self.consecutive = 0

    def failure(self) -> bool:
        """Record a failure; True if this one opened the breaker."""
        self.consecutive += 1
        if not self.open and self.consecutive >= self.threshold:
            self.open = True
            self.opened += 1
            return True
        return False

    def close(self) -> None:
        self.open = False
        self.consecutive = 0


# ------------------------------------------------------- a lean RESP client

# The hot paths need a handful of commands (EVALSHA, SCRIPT LOAD, PING, PUBLISH and the handshake), so
# NexGate speaks RESP itself over ONE pipelined connection per process (why not redis-py: its cost per
# call, in benchmarks/README.md, "Figures behind the code's design comments"): calls made in the same loop iteration go
# out in one write, replies are matched to callers in order, and a caller that timed out leaves its
# reply to be skipped, so the connection stays usable.


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""


def encode_command(*args: object) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def time_out(reply: asyncio.Future) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError())  # its reply, when it comes, is skipped


class _RespProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[asyncio.Future] = deque()
        # hiredis (redis-py's C reply parser): a reply costs a fraction of a microsecond to read.
        self.reader = hiredis.Reader(replyError=RespError)
        self.closed = False
        self._out: list[bytes | Callable[[], bytes]] = []
        self._flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def call(self, payload: bytes | Callable[[], bytes]) -> asyncio.Future:
        """Queue one command; its reply resolves the future. Calls of one loop iteration share a write.

        ``payload`` may be a function that builds the command when the write goes out: the command
        keeps its place in the pipeline, and whatever is added to it until then still travels in it.
        """
        if self.closed:
            raise ConnectionError("connection closed")
        future = self.loop.create_future()
        self.waiters.append(future)
        self._out.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.closed:
            out, self._out = self._out, []
            parts = [part if part.__class__ is bytes else part() for part in out]  # type: ignore[operator]
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        try:
            while (value := reader.gets()) is not False:  # False: the next reply is not complete yet
                if not waiters:
                    raise ConnectionError("reply without a request")
                future = waiters.popleft()
                if not future.done():  # a caller that timed out is skipped, in order
                    if isinstance(value, RespError):
                        future.set_exception(value)
                    else:
                        future.set_result(value)
        except (ConnectionError, hiredis.ProtocolError) as exc:
            self.abort(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed by Redis"))

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        self._out.clear()
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"Redis connection lost ({type(exc).__name__})"))
                future.exception()  # retrieved: its caller may be gone

    def abort(self, exc: BaseException | None = None) -> None:
        self._fail(exc or ConnectionError("connection aborted"))
        if self.transport is not None:
            self.transport.abort()


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    """A unix socket (``unix://``) instead of host and port."""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    verify_tls: bool = True


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS), ``unix:///path[?db=N]``."""
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = parse_qs(parts.query)
    db_text = (query.get("db") or [""])[0]
    if not db_text and scheme != "unix":
        db_text = parts.path.lstrip("/")
    try:
        db = int(db_text or 0)
    except ValueError:
        raise ValueError(f"the Redis database in the URL must be a number, got {db_text!r}") from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if scheme == "unix":
        return RedisAddress(path=unquote(parts.path), db=db, username=username, password=password)
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"not a Redis URL: {scheme!r}")
    verify = (query.get("ssl_cert_reqs") or ["required"])[0].lower() not in ("none", "optional")
    return RedisAddress(host=parts.hostname or "127.0.0.1", port=parts.port or 6379, db=db, username=username,
                        password=password, tls=scheme == "rediss", verify_tls=verify)


class PushProtocol(_RespProtocol):
    """A subscriber connection: after the handshake, every reply is a push handed to ``on_push``.

    Commands go out with ``send`` (no reply is waited for: pongs and confirmations are pushes too).
    """

    def __init__(self) -> None:
        super().__init__()
        self.on_push: Callable[[object], None] | None = None
        self.lost: asyncio.Future[None] = self.loop.create_future()
        """Resolved when the connection is gone."""

    def send(self, payload: bytes) -> None:
        if self.closed or self.transport is None:
            raise ConnectionError("connection closed")
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        on_push = self.on_push
        if on_push is None:  # the handshake
            super().data_received(data)
            return
        reader = self.reader
        reader.feed(data)
        try:
            while (value := reader.gets()) is not False:
                if isinstance(value, RespError):
                    raise ConnectionError(f"Redis refused: {value}")
                on_push(value)
        except (ConnectionError, hiredis.ProtocolError) as exc:
            self.abort(exc)

    def _fail(self, exc: BaseException) -> None:
        super()._fail(exc)
        if not self.lost.done():
            self.lost.set_result(None)


async def open_resp(address: RedisAddress, client_name: str | None = None,
                    protocol: Callable[[], _RespProtocol] = _RespProtocol) -> _RespProtocol:
    """Connect and authenticate; the caller bounds the time."""
    loop = asyncio.get_running_loop()
    ssl_context = None
    if address.tls:
        import ssl

        ssl_context = ssl.create_default_context()
        if not address.verify_tls:
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
    if address.path is not None:
        _, conn = await loop.create_unix_connection(protocol, address.path)
    else:
        _, conn = await loop.create_connection(protocol, address.host, address.port, ssl=ssl_context)
    try:
        handshake = []
        if address.password is not None:
            auth = ("AUTH", address.username, address.password) if address.username else ("AUTH", address.password)
            handshake.append(conn.call(encode_command(*auth)))
        if address.db:
            handshake.append(conn.call(encode_command("SELECT", address.db)))
        if client_name:
            handshake.append(conn.call(encode_command("CLIENT", "SETNAME", client_name)))
        for reply in handshake:
            await reply
    except BaseException:
        conn.abort()
        raise
    return conn


# ------------------------------------------------------------------- the client


def process_client_name(role: str = "nexgate") -> str:
    """The name a worker's connections carry in ``CLIENT LIST``: the role and the process id."""
    return f"{role}-{os.getpid()}"


class RedisClient:
    """The Redis connection of a process: one pipelined connection, one circuit breaker, one probe.

    Scripts registered by plugins (``RedisScripts``) are loaded when it connects, and again by the
    first call that finds Redis forgot them (a restart). ``command`` runs one plain command (the
    bus's PUBLISH) under the same breaker.
    """

    def __init__(self, url: str, *, connect_timeout: float = 1.0, breaker_threshold: int = 3,
                 probe_interval: float = 0.5, max_probe_interval: float = 5.0,
                 client_name: str | None = None) -> None:
        self.url = url
        self.address = parse_redis_url(url)
        self.connect_timeout = connect_timeout
        self.probe_interval = probe_interval
        self.max_probe_interval = max_probe_interval
        self.client_name = client_name or process_client_name()
        self.breaker = CircuitBreaker(breaker_threshold)
        self._lua: dict[str, bytes] = {}
        """sha1 -> Lua of every registered script, loaded on each new connection."""
        self._conn: _RespProtocol | None = None
        self._connecting: asyncio.Future[_RespProtocol] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._last_warning = 0.0

    def register(self, lua: bytes, sha: str) -> None:
        """Load this script on every connection from now on (and on the one open now)."""
        if sha in self._lua:
            return
        self._lua[sha] = lua
        conn = self._conn
        if conn is not None and not conn.closed:
            # Queued before any call of it on this connection, so it is there when they run.
            conn.call(encode_command("SCRIPT", "LOAD", lua)).add_done_callback(_retrieve)

    async def start(self) -> None:
        # Connect and load the scripts now, so no request pays for it; an absent Redis is not fatal here.
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._conn = await self._open()
        except Exception as exc:
            self._fail(exc, "shared state")

    async def close(self) -> None:
        await stop_tasks(self._prober, self._connecting)
        self._prober = self._connecting = None
        if self._conn is not None:
            self._conn.abort()
            self._conn = None

    # -- the connection

    async def _open(self) -> _RespProtocol:
        conn = await open_resp(self.address, self.client_name)
        try:
            loads = [conn.call(encode_command("SCRIPT", "LOAD", lua)) for lua in list(self._lua.values())]
            for reply in loads:
                await reply
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _connection(self) -> _RespProtocol:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect_once())
            # Waiters may all time out; the outcome is still retrieved.
            self._connecting.add_done_callback(_retrieve)
        return await asyncio.shield(self._connecting)

    async def _connect_once(self) -> _RespProtocol:
        async with asyncio.timeout(self.connect_timeout):
            conn = await self._open()
        self._conn = conn
        return conn

    async def command(self, *args: object, timeout: float, label: str = "shared state") -> object:
        """One command, bounded by the timeout; StateUnavailable when it got no answer."""
        if self.breaker.open:
            raise StateUnavailable("circuit open", sent=False)
        sent = False
        try:
            async with asyncio.timeout(timeout):
                conn = await self._connection()
                sent = True
                result = await conn.call(encode_command(*args))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # timeouts, connection errors, error replies: all mean "no answer"
            self._fail(exc, label)
            raise StateUnavailable(type(exc).__name__, sent=sent) from None
        self.breaker.success()
        return result

    def _fail(self, exc: BaseException, label: str) -> None:
        if self.breaker.failure():
            log.warning("%s (Redis) failed %d times in a row (%s); circuit open, probing in the background",
                        label, self.breaker.threshold, type(exc).__name__)
            if self._conn is not None:
                self._conn.abort()  # a wedged connection is not reused; the probe opens a fresh one
                self._conn = None
            if self._prober is None or self._prober.done():
                self._prober = asyncio.create_task(self._probe_until_up(), name=f"{self.client_name}-probe")
        else:
            now = time.monotonic()
            if now - self._last_warning > 10.0:
                self._last_warning = now
                log.warning("%s (Redis) call failed: %s", label, type(exc).__name__)

    async def _probe_until_up(self) -> None:
        interval = self.probe_interval
        while self.breaker.open:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    conn = await self._open()
                    await conn.call(encode_command("PING"))
            except asyncio.CancelledError:
                raise
            except Exception:
                interval = min(interval * 2, self.max_probe_interval)
                continue
            self._conn = conn
            self.breaker.close()
            log.warning("Redis answers again; circuit closed")


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def shared_client(redis: RedisClient | str, **options: object) -> tuple[RedisClient, bool]:
    """The process's client, or (a URL: a command line, a test) one of its own: (client, owned)."""
    if isinstance(redis, RedisClient):
        return redis, False
    return RedisClient(redis, **options), True  # type: ignore[arg-type]


class RedisScripts:
    """A plugin's Lua scripts, run on the process's ``RedisClient``.

    One EVALSHA per call, bounded by a tight timeout; a script Redis forgot (restart) is loaded
    again once. The client's circuit breaker answers at once with ``StateUnavailable`` while open,
    so a dead Redis costs nothing per request. ``failures`` and ``round_trips`` count this
    plugin's calls. Given a URL instead of a client, it opens (and closes) a client of its own.
    """

    def __init__(self, redis: RedisClient | str, scripts: Mapping[str, str], *, label: str,
                 timeout: float = 0.1) -> None:
        self.redis, self._owns_client = shared_client(redis, connect_timeout=max(timeout, 1.0))
        self.label = label
        self.timeout = timeout
        self.breaker = self.redis.breaker
        self.failures = 0
        """Calls that failed (timeout, connection, server error)."""
        self.round_trips = 0
        """EVALSHA calls sent: one request and one reply each (several may share one TCP write)."""
        self._scripts = {name: (lua.encode(), hashlib.sha1(lua.encode()).hexdigest())
                         for name, lua in scripts.items()}
        for lua, sha in self._scripts.values():
            self.redis.register(lua, sha)

    @property
    def connect_timeout(self) -> float:
        return self.redis.connect_timeout

    async def start(self) -> None:
        if self._owns_client:
            await self.redis.start()

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.close()

    async def call(self, script: str, keys: Sequence[str], args: Sequence[object],
                   timeout: float | None = None) -> object:
        """EVALSHA one of the scripts: one round trip, bounded by the timeout; StateUnavailable on failure."""
        if self.breaker.open:
            raise StateUnavailable("circuit open", sent=False)
        conn = self.redis._conn
        if conn is None or conn.closed:
            return await self._call_connecting(script, keys, args, timeout)
        self.round_trips += 1
        reply = conn.call(encode_command("EVALSHA", self._scripts[script][1], len(keys), *keys, *args))
        # A timer on the reply bounds it as asyncio.timeout() would, for a fraction of the CPU per call.
        timer = conn.loop.call_later(timeout or self.timeout, time_out, reply)
        try:
            result = await reply
        except asyncio.CancelledError:
            raise
        except RespError as exc:
            if str(exc).startswith("NOSCRIPT"):
                return await self._call_connecting(script, keys, args, timeout)  # loads it again
            self._fail(exc)
            raise StateUnavailable(type(exc).__name__) from None
        except Exception as exc:  # timeouts, connection errors: all mean "no answer"
            self._fail(exc)
            raise StateUnavailable(type(exc).__name__) from None
        finally:
            timer.cancel()
        self.breaker.success()
        return result

    async def _call_connecting(self, script: str, keys: Sequence[str], args: Sequence[object],
                               timeout: float | None) -> object:
        """``call`` when there is no connection yet, or Redis forgot the script."""
        lua, sha = self._scripts[script]
        sent = False
        try:
            async with asyncio.timeout(timeout or self.timeout):
                conn = await self.redis._connection()
                sent = True
                self.round_trips += 1
                payload = encode_command("EVALSHA", sha, len(keys), *keys, *args)
                try:
                    result = await conn.call(payload)
                except RespError as exc:
                    if not str(exc).startswith("NOSCRIPT"):
                        raise
                    # Redis restarted and lost its script cache: load and run again, once.
                    loaded = await conn.call(encode_command("SCRIPT", "LOAD", lua))
                    sha = loaded.decode() if isinstance(loaded, bytes) else sha
                    self._scripts[script] = (lua, sha)
                    self.round_trips += 1
                    result = await conn.call(encode_command("EVALSHA", sha, len(keys), *keys, *args))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # timeouts, connection errors, error replies: all mean "no answer"
            self._fail(exc)
            raise StateUnavailable(type(exc).__name__, sent=sent) from None
        self.breaker.success()
        return result

    def _fail(self, exc: BaseException) -> None:
        self.failures += 1
        self.redis._fail(exc, self.label)
