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
* ``RedisBus``: Redis pub/sub on one channel. Pub/sub does not store messages,
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

import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..background import stop_tasks

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
    """Redis pub/sub bus that survives Redis restarts without help."""

    def __init__(
        self,
        url: str,
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
        self.url = url
        self.channel = channel
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.ping_interval = ping_interval
        self.client_name = client_name
        # Lets the listener skip echoes of our own messages, already delivered locally.
        self._origin = secrets.token_hex(8)
        self._publisher: redis_asyncio.Redis | None = None
        self._subscriber: redis_asyncio.Redis | None = None
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._subscription_count = 0
        self._in_outage = False
        self._last_publish_warning = 0.0

    @property
    def connected(self) -> bool:
        """True while the subscription is live (for health checks)."""
        return self._subscribed.is_set()

    def _client(self, *, timeout: float, retries: int) -> redis_asyncio.Redis:
        return redis_asyncio.from_url(
            self.url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), retries),
            client_name=self.client_name,
        )

    async def start(self) -> None:
        """Connect and subscribe. Waits up to ``connect_timeout``, then keeps trying in the background."""
        if self._listener is not None:
            return
        # One retry lets a publish recover from a pooled connection that died with a Redis restart.
        self._publisher = self._client(timeout=self.publish_timeout, retries=1)
        # No retries: the listener must see every disconnect so it can announce EVICT_ALL.
        self._subscriber = self._client(timeout=self.connect_timeout, retries=0)
        self._listener = asyncio.create_task(self._listen_forever(), name="nexgate-invalidation-bus")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), self.connect_timeout)

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        await stop_tasks(listener)
        self._subscribed.clear()
        for client in (self._publisher, self._subscriber):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._publisher = self._subscriber = None

    async def publish(self, kind: str, value: str) -> bool:
        """Deliver locally at once, then to other instances. Never raises on Redis failure; returns False."""
        _check_message(kind, value)
        payload = json.dumps({"o": self._origin, "k": kind, "v": value}, separators=(",", ":"))
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ValueError("bus message is too large")
        # Local first: this instance must evict even when Redis is down.
        self._deliver(kind, value)
        if self._publisher is None:
            self._warn_publish_failure("bus not started")
            return False
        try:
            await asyncio.wait_for(self._publisher.publish(self.channel, payload), self.publish_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # redis errors, OSError, TimeoutError: all mean "not sent"
            self._warn_publish_failure(f"{type(exc).__name__}: {exc}")
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
        if self._subscriber is None:
            raise RuntimeError("bus is closed")
        loop = asyncio.get_running_loop()
        pubsub = self._subscriber.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            subscribe_deadline = loop.time() + self.connect_timeout
            last_heard = loop.time()
            ping_sent_at: float | None = None
            while True:
                message = await pubsub.get_message(timeout=min(1.0, self.ping_interval))
                now = loop.time()
                if message is not None:
                    last_heard, ping_sent_at = now, None
                    self._handle(message)
                    continue
                if not self._subscribed.is_set() and now > subscribe_deadline:
                    raise ConnectionError("no subscribe confirmation from Redis")
                if ping_sent_at is not None and now - ping_sent_at > self.connect_timeout:
                    # A half-open TCP connection never errors; an unanswered ping is how we notice.
                    raise ConnectionError("Redis did not answer ping")
                if ping_sent_at is None and now - last_heard >= self.ping_interval:
                    await pubsub.ping()
                    ping_sent_at = now
        finally:
            self._subscribed.clear()
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _handle(self, message: dict[str, Any]) -> None:
        message_type = message.get("type")
        if message_type == "subscribe":
            # Only now is the server-side subscription active. Whatever was published
            # before it (or during an outage) never reached us: drop all cached entries.
            self._subscription_count += 1
            self._subscribed.set()
            if self._in_outage:
                self._in_outage = False
                logger.info("invalidation bus reconnected to Redis; evicting all cached entries")
            self._deliver(EVICT_ALL, "")
            return
        if message_type != "message":
            return  # pong, unsubscribe
        parsed = self._decode(message.get("data"))
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


def open_bus(url: str, **options: Any) -> InvalidationBus:
    """``memory://`` for one process, ``redis://`` or ``rediss://`` to share with other instances."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        if options:
            raise ValueError(f"memory bus takes no options: {sorted(options)}")
        return MemoryBus()
    if scheme in ("redis", "rediss"):
        return RedisBus(url, **options)
    raise ValueError(f"unsupported invalidation bus URL scheme {scheme!r} (use memory://, redis:// or rediss://)")
