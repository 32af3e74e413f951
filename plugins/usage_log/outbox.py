"""A local, append-only outbox of usage rows, flushed to the store in batches.

Each row is appended (one ``write`` on an ``O_APPEND`` file) before the client
receives the last byte of its answer, so a gateway killed right afterwards
loses nothing: at the next start, and whenever the store comes back after an
outage, leftover segments are replayed. Replays are harmless: the store inserts
each request id once and charges only the rows it inserts (one debit per account
and batch).

Segments: each worker appends to its own file, locked with ``flock`` while in
use. A flush rotates to a new segment, sends the old one's rows, then deletes
it. A segment nobody holds a lock on belongs to a dead process and is replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from nexgate_proxy.background import stop_tasks
from nexgate_proxy.store import UsageRecord

log = logging.getLogger("nexgate.outbox")

Sink = Callable[[Sequence[UsageRecord]], Awaitable[int]]


_FIELD_COUNT = len(UsageRecord._fields)
_encode = json.JSONEncoder(separators=(",", ":")).encode


_quote = json.encoder.encode_basestring_ascii  # what the encoder does to a str, in C
_INT_OR_NONE = (int, type(None))


def encode_row(row: UsageRecord) -> bytes:
    """One line: the record's values in field order, ts as epoch seconds (this runs on every request).

    Written field by field, the same bytes as the JSON encoder's in a third less time, for the
    types the redaction guard lets through; anything else goes to the encoder."""
    (request_id, ts, endpoint, model, provider, upstream_model, account_id, org_id, key_id, key_prefix, prompt,
     completion, cached, estimated, estimated_cost, cost, latency, status, error_code, stream, ip, attempts) = row
    if (type(prompt) is int and type(completion) is int and type(cached) is int and type(latency) is int
            and type(status) is int and type(attempts) is int and type(estimated) is bool and type(stream) is bool
            and type(estimated_cost) in _INT_OR_NONE and type(cost) in _INT_OR_NONE):
        try:
            return (
                f'[{_quote(request_id)},{ts.timestamp()!r},{_quote(endpoint)},{_text(model)},{_text(provider)},'
                f'{_text(upstream_model)},{_text(account_id)},{_text(org_id)},{_text(key_id)},{_text(key_prefix)},'
                f'{prompt},{completion},{cached},{"true" if estimated else "false"},'
                f'{"null" if estimated_cost is None else estimated_cost},{"null" if cost is None else cost},'
                f'{latency},{status},{_text(error_code)},{"true" if stream else "false"},{_text(ip)},{attempts}]\n'
            ).encode()
        except (TypeError, AttributeError):  # a field that is not a str (or ts not a datetime)
            pass
    return _encode((row[0], row[1].timestamp(), *row[2:])).encode() + b"\n"


def _text(value: str | None) -> str:
    return "null" if value is None else _quote(value)


def decode_row(line: bytes) -> UsageRecord:
    values = json.loads(line)
    if not isinstance(values, list) or len(values) != _FIELD_COUNT:
        raise ValueError("not a usage row")
    values[1] = datetime.fromtimestamp(values[1], timezone.utc)
    return UsageRecord(*values)


@dataclass
class _Segment:
    path: Path
    fd: int
    rows: list[UsageRecord] = field(default_factory=list)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _open_locked(path: Path, create: bool) -> int | None:
    flags = os.O_RDWR | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None  # a live process owns it
    return fd


def _read_rows(fd: int, path: Path) -> list[UsageRecord]:
    rows = []
    with open(fd, "rb", closefd=False) as f:
        f.seek(0)
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                log.warning("%s: ignoring a torn last line (the writer died mid-write)", path.name)
                break
            try:
                rows.append(decode_row(line))
            except (ValueError, TypeError, KeyError):
                log.error("%s: line %d is not a usage row; skipped", path.name, number)
    return rows


class Outbox:
    def __init__(self, directory: str | os.PathLike[str], sink: Sink, *, batch_size: int = 500,
                 flush_interval: float = 1.0) -> None:
        self.directory = Path(directory)
        self.sink = sink
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.flushed = 0
        self.failures = 0
        self.flushed_at = time.monotonic()
        """When the last flush left nothing behind (metrics: the flush lag)."""
        self.rejected = 0
        self._active: _Segment | None = None
        self._sealed: list[_Segment] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._healthy = True
        self._orphans_left = False

    # ---------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._active = self._new_segment()
        await self.replay_orphans()
        self._task = asyncio.create_task(self._run(), name="nexgate-outbox-flusher")

    async def stop(self) -> None:
        await stop_tasks(self._task)
        await self.flush()
        if self._active is not None and not self._active.rows:
            self._delete(self._active)
            self._active = None
        # Anything not flushed stays on disk, unlocked, for the next start to replay.
        for segment in [*self._sealed, *([self._active] if self._active else [])]:
            segment.close()

    @property
    def pending(self) -> int:
        return sum(len(s.rows) for s in self._sealed) + (len(self._active.rows) if self._active else 0)

    def lag(self) -> float:
        """Seconds since the outbox was last empty in the store; 0 while nothing waits."""
        return time.monotonic() - self.flushed_at if self.pending else 0.0

    @property
    def healthy(self) -> bool:
        """False while the last flush failed (the store is unreachable)."""
        return self._healthy

    # ------------------------------------------------------------- append

    def append(self, row: UsageRecord) -> None:
        """Durable against a process kill once this returns (page cache); fsync'd each flush."""
        assert self._active is not None, "the outbox is started with the gateway"
        os.write(self._active.fd, encode_row(row))
        self._active.rows.append(row)
        if len(self._active.rows) >= self.batch_size:
            self._wake.set()

    # -------------------------------------------------------------- flush

    async def flush(self) -> bool:
        """Send everything appended so far; True when nothing is left behind."""
        async with self._lock:
            if self._active is not None and self._active.rows:
                await asyncio.get_running_loop().run_in_executor(None, os.fsync, self._active.fd)
                self._sealed.append(self._active)
                self._active = self._new_segment()
            while self._sealed:
                segment = self._sealed[0]
                try:
                    await self._send(segment.rows)
                except Exception as exc:
                    self.failures += 1
                    if self._healthy:
                        log.warning("usage flush failed (%s); %d rows kept in the outbox, retrying",
                                    type(exc).__name__, self.pending)
                    self._healthy = False
                    return False
                self.flushed += len(segment.rows)
                self._sealed.pop(0)
                self._delete(segment)
            if not self._healthy:
                log.info("usage flush recovered")
            self._healthy = True
            self.flushed_at = time.monotonic()
            return True

    async def replay_orphans(self) -> int:
        """Send the rows of segments left by dead processes; return how many rows were sent."""
        sent = 0
        own = {s.path for s in [*self._sealed, *([self._active] if self._active else [])]}
        for path in sorted(self.directory.glob("*.jsonl")):
            if path in own:
                continue
            fd = _open_locked(path, create=False)
            if fd is None:
                continue
            segment = _Segment(path, fd)
            try:
                rows = _read_rows(fd, path)
                await self._send(rows)
            except Exception as exc:
                log.warning("replaying %s failed (%s); will retry", path.name, type(exc).__name__)
                segment.close()
                self._orphans_left = True
                return sent
            sent += len(rows)
            log.info("replayed %d usage rows from %s", len(rows), path.name)
            self._delete(segment)
        self._orphans_left = False
        return sent

    async def _send(self, rows: Sequence[UsageRecord]) -> None:
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            try:
                await self.sink(batch)
            except (ValueError, TypeError):
                # The store refused a row's values (not a connection problem): retrying the
                # batch would fail forever. Send rows one by one and set the bad ones aside.
                for row in batch:
                    try:
                        await self.sink([row])
                    except (ValueError, TypeError) as exc:
                        self._set_aside(row, exc)

    def _set_aside(self, row: UsageRecord, exc: Exception) -> None:
        self.rejected += 1
        log.error("usage row %s refused by the store (%s); kept in rejected.jsonl", row.request_id,
                  type(exc).__name__)
        # Kept for an operator to inspect, outside the store's IP retention: without the client IP.
        with open(self.directory / "rejected.jsonl", "ab") as f:
            f.write(encode_row(row._replace(client_ip=None)))

    async def _run(self) -> None:
        backoff = self.flush_interval
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            self._wake.clear()
            ok = await self.flush()
            if ok and self._orphans_left:
                await self.replay_orphans()  # the store is back: finish what a dead process left
            backoff = self.flush_interval if ok else min(backoff * 2, 30.0)

    # ------------------------------------------------------------ helpers

    def _new_segment(self) -> _Segment:
        name = f"{int(time.time() * 1000)}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        path = self.directory / name
        fd = _open_locked(path, create=True)
        assert fd is not None
        return _Segment(path, fd)

    def _delete(self, segment: _Segment) -> None:
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()
        segment.close()
