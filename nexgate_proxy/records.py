"""The usage record: the metadata of one request, the only thing about it that may be kept.

One type from end to end: the hooks receive it (``nexgate_guard_record``,
``nexgate_record``), the usage log spools it, the store writes it as a
``usage_records`` row and reads it back. Its fields are the table's columns, in
order, so a record is its own row of SQL parameters.

A ``NamedTuple`` because one is built on every request: it is immutable (what a
guard checked is what every sink gets) and costs one tuple to make.

Every field is a scalar of bounded size; there is deliberately no field (and no
column) that could hold prompt or completion content.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple


class UsageRecord(NamedTuple):
    request_id: str
    ts: datetime
    """When the request started; timezone-aware UTC (naive datetimes are refused by the store)."""
    endpoint: str
    """The API operation, e.g. "chat.completions"."""
    model: str | None
    """The configured model alias the client asked for; None when it matched no route."""
    provider: str | None
    upstream_model: str | None
    account_id: str | None
    """The account that pays (user or organization id); None for unauthenticated requests."""
    org_id: str | None
    key_id: str | None
    key_prefix: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    usage_estimated: bool
    """True when the token counts are NexGate's estimate, not the upstream's report."""
    estimated_cost_pico: int | None
    """The worst case held before the call (pico-USD); None when nothing was priced."""
    actual_cost_pico: int | None
    """What the request is charged (pico-USD): the store debits it from account_id when positive."""
    latency_ms: int
    status: int
    error_code: str | None
    stream: bool
    client_ip: str | None
    """Personal data: nulled once older than the IP retention period."""
    attempts: int


USAGE_FIELDS: tuple[str, ...] = UsageRecord._fields
"""usage_records columns = UsageRecord fields, in this order."""
