"""Cross-instance cache invalidation: "key X was revoked" reaches every gateway's caches.

Each instance keeps short-lived in-memory caches (verified API keys, ...). When
one instance changes something, it publishes ``(kind, value)``; every
subscriber on every instance, including the publisher's own, gets the same
callback, so there is exactly one eviction code path. Changes to the store
(revoked keys, organizations' limits) travel on the store's change feed
(``nexgate_proxy.store.feed``), which hands them to the same subscribers through
``deliver_local``; what is published here is hot state only (IP bans).

Two backends share one interface:

* ``MemoryBus``: a single process (tests, single-instance deployments).
* ``RedisBus``: Redis pub/sub on one channel, on a subscriber connection of its
  own, publishing through the process's ``RedisClient``. Pub/sub does not store messages,
  so anything sent while an instance was disconnected is lost to it; each time
  the subscription (re)starts the bus delivers ``(EVICT_ALL, "")`` so
  subscribers drop everything they cached instead of trusting stale entries.

Redis trouble never propagates to callers: publish returns False and logs,
and the listener reconnects on its own with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
from abc import ABC, abstractmethod
from typing import Any, Callable
from urllib.parse import urlsplit

from ..background import stop_tasks
from .redis import PushProtocol, RedisClient, StateUnavailable, encode_command, open_resp, shared_client

logger = logging.getLogger(__name__)

InvalidationCallback = Callable[[str, str], None]

DEFAULT_CHANNEL = "nexgate:invalidate"
# Delivered after a (re)connect: messages may have been missed, so drop every cached entry.
EVICT_ALL = "*"
MAX_MESSAGE_BYTES = 16 * 1024


def _check_message(kind: str, value: str) -> None:
    if not isinstance(kind, str) or not kind:
        raise ValueError("bus message kind must be a non-empty string")
    if not isinstance(value, str):
        raise ValueError("bus message value must be a string")


class InvalidationBus(ABC):
    """Publish ``(kind, value)`` to every instance; call subscribers for each message."""

    def __init__(self) -> None:
        self._callbacks: list[InvalidationCallback] = []

    def subscribe(self, callback: InvalidationCallback) -> Callable[[], None]:
        """Call ``callback(kind, value)`` for every message, own ones included. Returns an unsubscribe function."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    def deliver_local(self, kind: str, value: str) -> None:
        """Call this process's subscribers only: for what other instances learn another way (the store feed)."""
        _check_message(kind, value)
        self._deliver(kind, value)

    def _deliver(self, kind: str, value: str) -> None:
        for callback in list(self._callbacks):
            try:
                callback(kind, value)
            except Exception:
                # One broken subscriber must not keep the others from evicting.
                logger.exception("invalidation subscriber failed for kind %r", kind)

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def publish(self, kind: str, value: str) -> bool:
        """Deliver to every instance. True if the backend accepted the message; never raises on backend failure."""


class MemoryBus(InvalidationBus):
    """In-process bus: publish calls the subscribers directly."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def publish(self, kind: str, value: str) -> bool:
        _check_message(kind, value)
        self._deliver(kind, value)
        return True


class RedisBus(InvalidationBus):
    """Redis pub/sub bus that survives Redis restarts without help.

    It listens on a subscriber connection of its own (pub/sub takes a connection over, by protocol)
    and publishes through the process's ``RedisClient``, under its circuit breaker. Given a URL
    instead of a client (a command line, a test), it opens a client of its own with the same name.
    """

    def __init__(
        self,
        redis: RedisClient | str,
        *,
        channel: str = DEFAULT_CHANNEL,
        publish_timeout: float = 0.5,
        connect_timeout: float = 2.0,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        ping_interval: float = 5.0,
        client_name: str = "nexgate-bus",
    ) -> None:
        super().__init__()
        self.redis, self._owns_client = shared_client(redis, connect_timeout=connect_timeout,
                                                      client_name=client_name)
        self.channel = channel
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.ping_interval = ping_interval
        self.client_name = client_name
        """The subscriber connection's name in ``CLIENT LIST``."""
        # Lets the listener skip echoes of our own messages, already delivered locally.
        self._origin = secrets.token_hex(8)
        self._started = False
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._subscription_count = 0
        self._heard_at = 0.0
        """When the subscriber connection last received anything (loop time)."""
        self._in_outage = False
        self._last_publish_warning = 0.0

    @property
    def connected(self) -> bool:
        """True while the subscription is live (for health checks)."""
        return self._subscribed.is_set()

    async def start(self) -> None:
        """Connect and subscribe. Waits up to ``connect_timeout``, then keeps trying in the background."""
        if self._listener is not None:
            return
        self._started = True
        if self._owns_client:
            await self.redis.start()
        self._listener = asyncio.create_task(self._listen_forever(), name="nexgate-invalidation-bus")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), self.connect_timeout)

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        await stop_tasks(listener)
        self._subscribed.clear()
        self._started = False
        if self._owns_client:
            await self.redis.close()

    async def publish(self, kind: str, value: str) -> bool:
        """Deliver locally at once, then to other instances. Never raises on Redis failure; returns False."""
        _check_message(kind, value)
        payload = json.dumps({"o": self._origin, "k": kind, "v": value}, separators=(",", ":"))
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ValueError("bus message is too large")
        # Local first: this instance must evict even when Redis is down.
        self._deliver(kind, value)
        if not self._started:
            self._warn_publish_failure("bus not started")
            return False
        try:
            await self.redis.command("PUBLISH", self.channel, payload, timeout=self.publish_timeout,
                                     label="invalidation bus")
        except StateUnavailable as exc:  # timeouts, connection errors, an open circuit: all mean "not sent"
            self._warn_publish_failure(str(exc))
            return False
        return True

    def _warn_publish_failure(self, detail: str) -> None:
        # A Redis outage could mean thousands of failed publishes; one warning per 10 s is enough.
        now = time.monotonic()
        if now - self._last_publish_warning >= 10.0:
            self._last_publish_warning = now
            logger.warning("invalidation publish to Redis failed (%s); other instances may serve stale cache", detail)
        else:
            logger.debug("invalidation publish to Redis failed (%s)", detail)

    async def _listen_forever(self) -> None:
        backoff = self.initial_backoff
        while True:
            subscriptions_before = self._subscription_count
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._subscription_count != subscriptions_before:
                    backoff = self.initial_backoff  # we were up: retry fast
                if not self._in_outage:
                    self._in_outage = True
                    logger.warning(
                        "invalidation bus lost Redis (%s: %s); reconnecting in the background",
                        type(exc).__name__, exc,
                    )
                else:
                    logger.debug("invalidation bus reconnect failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.max_backoff)

    async def _listen_once(self) -> None:
        """Subscribe and dispatch until the connection fails, then raise."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            conn = await open_resp(self.redis.address, self.client_name, PushProtocol)
        assert isinstance(conn, PushProtocol)
        try:
            conn.on_push = self._on_push
            conn.send(encode_command("SUBSCRIBE", self.channel))
            subscribe_deadline = loop.time() + self.connect_timeout
            self._heard_at = heard = loop.time()
            ping_sent_at: float | None = None
            while True:
                await asyncio.wait((conn.lost,), timeout=min(1.0, self.ping_interval))
                if conn.closed:
                    raise ConnectionError("Redis closed the subscriber connection")
                now = loop.time()
                if self._heard_at != heard:  # pushes (messages, the pong) came in meanwhile
                    heard, ping_sent_at = self._heard_at, None
                if not self._subscribed.is_set() and now > subscribe_deadline:
                    raise ConnectionError("no subscribe confirmation from Redis")
                if ping_sent_at is not None and now - ping_sent_at > self.connect_timeout:
                    # A half-open TCP connection never errors; an unanswered ping is how we notice.
                    raise ConnectionError("Redis did not answer ping")
                if ping_sent_at is None and now - heard >= self.ping_interval:
                    conn.send(encode_command("PING"))
                    ping_sent_at = now
        finally:
            self._subscribed.clear()
            conn.abort()

    def _on_push(self, push: object) -> None:
        self._heard_at = asyncio.get_running_loop().time()
        if not isinstance(push, list) or not push:
            return
        push_type = push[0]
        if push_type == b"subscribe":
            # Only now is the server-side subscription active. Whatever was published
            # before it (or during an outage) never reached us: drop all cached entries.
            self._subscription_count += 1
            self._subscribed.set()
            if self._in_outage:
                self._in_outage = False
                logger.info("invalidation bus reconnected to Redis; evicting all cached entries")
            self._deliver(EVICT_ALL, "")
            return
        if push_type != b"message" or len(push) != 3:
            return  # pong, unsubscribe
        parsed = self._decode(push[2])
        if parsed is None:
            logger.warning("ignoring malformed message on invalidation channel %r", self.channel)
            return
        origin, kind, value = parsed
        if origin != self._origin:
            self._deliver(kind, value)

    @staticmethod
    def _decode(data: Any) -> tuple[str, str, str] | None:
        if not isinstance(data, (bytes, str)) or len(data) > MAX_MESSAGE_BYTES:
            return None
        try:
            decoded = json.loads(data)
        except ValueError:
            return None
        if not isinstance(decoded, dict):
            return None
        origin, kind, value = decoded.get("o"), decoded.get("k"), decoded.get("v")
        if not (isinstance(origin, str) and isinstance(kind, str) and kind and isinstance(value, str)):
            return None
        return origin, kind, value


def open_bus(url: str, *, redis: RedisClient | None = None, **options: Any) -> InvalidationBus:
    """``memory://`` for one process; ``redis://``, ``rediss://`` or ``unix://`` to share with other instances.

    ``redis``: the process's client for that URL, to publish through (without it, the bus opens one).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        if options:
            raise ValueError(f"memory bus takes no options: {sorted(options)}")
        return MemoryBus()
    if scheme in ("redis", "rediss", "unix"):
        return RedisBus(redis or url, **options)
    raise ValueError(f"unsupported invalidation bus URL scheme {scheme!r} "
                     "(use memory://, redis://, rediss:// or unix://)")
