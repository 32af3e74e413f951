"""Fast verifiers: keys verified once by bcrypt are re-admitted with an HMAC (restarts, cache evictions).

After a bcrypt says yes, the gateway keeps, per public key id, 20 bytes derived with a server-side
secret, the *pepper* (never in the database or the state store):

* ``tag = HMAC-SHA256(pepper, "secret" | key id | secret)[:12]``: a later request with the same
  secret is admitted with one HMAC, not a bcrypt; a different secret is refused with none;
* ``fp = HMAC-SHA256(pepper, "hash" | key id | bcrypt hash)[:8]``: the tag is only believed while
  the key's row holds the hash it was made for.

In memory they live in a fixed-size table (32 bytes a key: id, fp, tag) in an anonymous mmap (pages
are only backed once written); they persist in the state store (a Redis hash when ``state.url`` is
Redis, else an append-only local file, 0600) so that a restarted gateway serves its keys at once.
What a leak of the database plus the state store gives: public ids, bcrypt hashes and these MACs.
Without the pepper nothing can be checked against them; with it, a guess of a 190-bit random secret
can be checked fast, which is still infeasible. Forging (writing a tag for a chosen secret) needs
the pepper *and* write access to the state: keep the pepper out of both (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import mmap
import os
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

from nexgate_proxy.background import stop_tasks
from nexgate_proxy.state.redis import RedisClient, StateUnavailable

from .settings import VerifierSettings

log = logging.getLogger("nexgate.auth")

ID_BYTES = 12  # a public key id: 12 ASCII base62 characters
FP_BYTES = 8
TAG_BYTES = 12  # 96 bits: an online guess has a 2**-96 chance
VALUE_BYTES = FP_BYTES + TAG_BYTES
SLOT = ID_BYTES + VALUE_BYTES  # 32
WAYS = 4
_EMPTY = bytes(ID_BYTES)
FLUSH_DELAY = 1.0
"""Seconds new verifiers wait to be written to the state store together."""
REDIS_KEY = "nexgate:auth:verifiers:"
"""+ the pepper's fingerprint: instances with another pepper keep theirs apart (theirs would not check here)."""
FILE_MAGIC = b"NGKV1\0\0\0"


def pepper_fingerprint(pepper: bytes) -> bytes:
    return hmac.digest(pepper, b"nexgate key verifier fingerprint", "sha256")[:8]


class VerifierTable:
    """public key id -> (fp, tag), set-associative (4 ways a bucket), at most ``size`` keys, 32 bytes each."""

    def __init__(self, size: int) -> None:
        self.buckets = max(1, -(-size // WAYS))
        self._mem = mmap.mmap(-1, self.buckets * WAYS * SLOT)
        self._victim = 0
        self.count = 0

    def _base(self, kid: bytes) -> int:
        return (hash(kid) % self.buckets) * WAYS * SLOT

    def _find(self, kid: bytes, base: int) -> int:
        mem = self._mem
        for offset in range(base, base + WAYS * SLOT, SLOT):
            if mem[offset:offset + ID_BYTES] == kid:
                return offset
        return -1

    def get(self, kid: bytes) -> bytes | None:
        offset = self._find(kid, self._base(kid))
        return None if offset < 0 else self._mem[offset + ID_BYTES:offset + SLOT]

    def put(self, kid: bytes, value: bytes) -> None:
        base = self._base(kid)
        offset = self._find(kid, base)
        if offset < 0:
            offset = self._find(_EMPTY, base)
            if offset < 0:  # a full bucket: replace one (its key pays one bcrypt on its next new verification)
                self._victim = (self._victim + 1) % WAYS
                offset = base + self._victim * SLOT
            else:
                self.count += 1
        self._mem[offset:offset + SLOT] = kid + value

    def drop(self, kid: bytes) -> bool:
        offset = self._find(kid, self._base(kid))
        if offset < 0:
            return False
        self._mem[offset:offset + SLOT] = bytes(SLOT)
        self.count -= 1
        return True

    def __len__(self) -> int:
        return self.count


class VerifierState(Protocol):
    """Where verifiers survive a restart: ``value`` None means dropped."""

    async def load(self) -> list[tuple[bytes, bytes | None]]: ...

    async def write(self, changes: dict[bytes, bytes | None]) -> None: ...


class RedisVerifierState:
    """One Redis hash per pepper: field = public key id, value = fp + tag (20 bytes)."""

    def __init__(self, redis: RedisClient, fingerprint: bytes, timeout: float = 2.0) -> None:
        self.redis = redis
        self.key = REDIS_KEY + fingerprint.hex()
        self.timeout = timeout

    async def load(self) -> list[tuple[bytes, bytes | None]]:
        found: list[tuple[bytes, bytes | None]] = []
        cursor: bytes | str = "0"
        while True:
            reply: Any = await self.redis.command("HSCAN", self.key, cursor, "COUNT", 2000,
                                                  timeout=self.timeout, label="auth verifiers")
            cursor, flat = reply[0], reply[1]
            found += [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
            if cursor in (b"0", "0"):
                return found

    async def write(self, changes: dict[bytes, bytes | None]) -> None:
        added = [part for kid, value in changes.items() if value is not None for part in (kid, value)]
        dropped = [kid for kid, value in changes.items() if value is None]
        if added:
            await self.redis.command("HSET", self.key, *added, timeout=self.timeout, label="auth verifiers")
        if dropped:
            await self.redis.command("HDEL", self.key, *dropped, timeout=self.timeout, label="auth verifiers")


class FileVerifierState:
    """An append-only file of 32-byte records (a dropped key: its id and zeros), after a header naming the pepper.

    Several worker processes append to it safely (O_APPEND, whole records); a file written with another
    pepper is started afresh.
    """

    def __init__(self, path: str, fingerprint: bytes) -> None:
        self.path = path
        self.header = FILE_MAGIC + fingerprint + bytes(SLOT - len(FILE_MAGIC) - len(fingerprint))

    async def load(self) -> list[tuple[bytes, bytes | None]]:
        return await asyncio.to_thread(self._load)

    def _load(self) -> list[tuple[bytes, bytes | None]]:
        try:
            data = Path(self.path).read_bytes()
        except FileNotFoundError:
            data = b""
        if not data.startswith(self.header):
            self._write_file(self.header)  # absent, or another pepper's: theirs would not check here
            return []
        usable = len(data) - len(data) % SLOT
        if usable != len(data):  # a record cut by a crash: drop it so later appends stay aligned
            os.truncate(self.path, usable)
        out: list[tuple[bytes, bytes | None]] = []
        for offset in range(SLOT, usable, SLOT):
            kid, value = data[offset:offset + ID_BYTES], data[offset + ID_BYTES:offset + SLOT]
            out.append((kid, None if value == bytes(VALUE_BYTES) else value))
        return out

    def _write_file(self, content: bytes, mode: int = os.O_TRUNC) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | mode, 0o600)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)

    async def write(self, changes: dict[bytes, bytes | None]) -> None:
        records = b"".join(kid + (value or bytes(VALUE_BYTES)) for kid, value in changes.items())
        await asyncio.to_thread(self._write_file, records, os.O_APPEND)


class Verifiers:
    """The table, its state store and the pepper, for the authenticator."""

    def __init__(self, size: int, pepper: bytes, state: VerifierState | None = None) -> None:
        self.table = VerifierTable(size)
        self._pepper = pepper
        self.state = state
        self._changes: dict[bytes, bytes | None] = {}
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.loaded = 0

    # -- the checks

    def lookup(self, public_id: str) -> bytes | None:
        """fp + tag of the key id, if one of its secrets was verified (before a row lookup)."""
        return self.table.get(public_id.encode("ascii"))

    def tag_matches(self, known: bytes, public_id: str, secret: str) -> bool:
        return hmac.compare_digest(known[FP_BYTES:], self._tag(public_id, secret))

    def hash_matches(self, known: bytes, public_id: str, secret_hash: str) -> bool:
        """The verifier was made for the bcrypt hash the row holds now (else it is stale)."""
        return hmac.compare_digest(known[:FP_BYTES], self._fp(public_id, secret_hash))

    def _tag(self, public_id: str, secret: str) -> bytes:
        return hmac.digest(self._pepper, b"secret\0" + public_id.encode() + b"\0" + secret.encode(),
                           "sha256")[:TAG_BYTES]

    def _fp(self, public_id: str, secret_hash: str) -> bytes:
        return hmac.digest(self._pepper, b"hash\0" + public_id.encode() + b"\0" + secret_hash.encode(),
                           "sha256")[:FP_BYTES]

    # -- changes

    def add(self, public_id: str, secret_hash: str, secret: str) -> None:
        """After a bcrypt said yes."""
        kid = public_id.encode("ascii")
        value = self._fp(public_id, secret_hash) + self._tag(public_id, secret)
        self.table.put(kid, value)
        self._queue(kid, value)

    def drop(self, public_id: str) -> None:
        """Revoked, expired, deleted or stale: the next use costs a bcrypt again (and is refused)."""
        kid = public_id.encode("ascii")
        if self.table.drop(kid):
            self._queue(kid, None)

    def _queue(self, kid: bytes, value: bytes | None) -> None:
        if self.state is not None:
            self._changes[kid] = value
            self._wake.set()

    # -- persistence

    async def start(self) -> None:
        if self.state is None:
            return
        try:
            for kid, value in await self.state.load():
                if value is None:
                    self.table.drop(kid)
                elif len(kid) == ID_BYTES and len(value) == VALUE_BYTES:
                    self.table.put(kid, value)
        except (OSError, StateUnavailable) as exc:
            log.warning("could not load the keys' fast verifiers (%s): keys verified before cost a bcrypt "
                        "again", exc)
        self.loaded = len(self.table)
        self._writer = asyncio.create_task(self._write_forever(), name="nexgate-auth-verifiers")

    async def stop(self) -> None:
        await stop_tasks(self._writer)
        self._writer = None
        await self.flush()

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_DELAY)
            await self.flush()

    async def flush(self) -> None:
        self._wake.clear()
        if not self._changes or self.state is None:
            return
        changes, self._changes = self._changes, {}
        try:
            await self.state.write(changes)
        except (OSError, StateUnavailable) as exc:
            log.warning("could not save %d fast verifiers (%s); will retry", len(changes), exc)
            for kid, value in changes.items():
                self._changes.setdefault(kid, value)


def random_pepper() -> bytes:
    return secrets.token_bytes(32)


def read_or_create_pepper(path: str) -> bytes:
    """The pepper kept in a file (0600), created with 32 random bytes (hex) the first time."""
    for _ in range(50):
        try:
            text = Path(path).read_text().strip()
        except FileNotFoundError:
            text = secrets.token_hex(32)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another worker process is creating it
                continue
            try:
                os.write(fd, text.encode() + b"\n")
            finally:
                os.close(fd)
        if text:
            return text.encode()
        time.sleep(0.02)  # created by another worker, not written yet
    raise OSError(f"the pepper file {path} stays empty")


def open_verifiers(settings: VerifierSettings, redis: RedisClient | None) -> Verifiers:
    """The verifiers with their pepper (configured, else kept next to the local file, else random) and
    their state store (Redis when ``state.url`` is, else the local file, else none)."""
    pepper = settings.pepper
    if pepper is None and settings.generated_pepper_file:
        try:
            pepper = read_or_create_pepper(settings.generated_pepper_file)
        except OSError as exc:
            log.warning("cannot keep a generated pepper in %s (%s): keys verified before a restart cost a bcrypt "
                        "again (set auth.verifiers.pepper)", settings.generated_pepper_file, exc)
    if pepper is None:
        pepper = random_pepper()
        if redis is not None:
            log.warning("auth.verifiers.pepper is not set: keys verified before a restart cost a bcrypt again "
                        "(set it, the same on every instance sharing state.url)")
        return Verifiers(settings.size, pepper, None)
    fingerprint = pepper_fingerprint(pepper)
    state: VerifierState | None = None
    if redis is not None:
        state = RedisVerifierState(redis, fingerprint)
    elif settings.file:
        state = FileVerifierState(settings.file, fingerprint)
    return Verifiers(settings.size, pepper, state)
