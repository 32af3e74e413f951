"""Money as the admin API and the CLI show it: balances, transactions, usage, monthly statements.

Every amount appears twice: ``<name>_usd``, an exact decimal string (never a
float), and ``<name>_pico``, the integer pico-USD the ledger holds.

A monthly statement covers one UTC calendar month of one account's ledger:
the opening balance (the balance at the first instant of the month), every
transaction of the month, and the closing balance; ``opening + sum(amounts)
== closing`` exactly. Request debits (one per account and usage batch, each
listing its requests) are summed per UTC day
so a statement stays printable (the store keeps those sums as it books the
debits); payments, grants, refunds and disputes are listed one by one. Usage
totals by model come from the store's daily usage totals of the month (by
request time; the debits are booked when the usage log flushes, a
second or so later, so a request at 23:59:59.9 on the last day can be charged
on the next month's statement).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nexgate_proxy.money import currency_exponent, format_minor_units, format_usd
from nexgate_proxy.store import LedgerEntry, Store, UsageRecord, UsageTotal

PAGE = 1000
"""Ledger rows read per store call while building a statement."""
REQUEST_SOURCE = "request"
"""The ledger source of the request debits (the store's record_usage: one per account and batch)."""

_MONTH = re.compile(r"(\d{4})-(\d{2})")


# ------------------------------------------------------------------- views


def iso(moment: datetime | None) -> str | None:
    """ISO-8601 in UTC with a ``Z``, or None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def money(name: str, pico: int | None) -> dict[str, Any]:
    """``{name}_usd`` (exact decimal string) and ``{name}_pico`` (int); both None when unknown."""
    return {f"{name}_usd": None if pico is None else format_usd(pico), f"{name}_pico": pico}


def balance_json(account_id: str, account_type: str, balance_pico: int) -> dict[str, Any]:
    return {"object": "balance", "account_id": account_id, "account_type": account_type, "currency": "usd",
            **money("balance", balance_pico)}


# Payment entries written before paid amounts were shown in major units: "...; paid 2360 USD",
# "...: 590 of 2360 USD" (minor units). Shown as a person reads them: "23.60 USD".
_MINOR_UNITS_SHOWN = re.compile(r"(?:(?<=; paid )|(?<=: ))(\d{1,18})(?: of (\d{1,18}))? ([A-Z]{3})$")


def shown_description(entry: LedgerEntry) -> str | None:
    """The entry's description for a person: amounts paid in major units with their currency."""
    text = entry.description
    match = _MINOR_UNITS_SHOWN.search(text) if text and entry.source == "dodopayments" else None
    if match is None or currency_exponent(match.group(3)) == 0:
        return text
    amount, paid, currency = match.groups()
    shown = format_minor_units(int(amount), currency)
    if paid is not None:
        shown = f"{shown} of {format_minor_units(int(paid), currency)}"
    return f"{text[:match.start()]}{shown}"


def transaction_json(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "object": "transaction", "id": entry.id, "account_id": entry.account_id, "kind": entry.kind,
        **money("amount", entry.amount_pico), "source": entry.source, "external_id": entry.external_id,
        "request_id": entry.request_id, "description": shown_description(entry), "created_at": iso(entry.created_at),
    }


USAGE_CSV_COLUMNS: tuple[str, ...] = (
    "request_id", "ts", "endpoint", "model", "provider", "upstream_model", "account_id", "org_id", "key_id",
    "key_prefix", "prompt_tokens", "completion_tokens", "cached_tokens", "usage_estimated",
    "estimated_cost_usd", "estimated_cost_pico", "actual_cost_usd", "actual_cost_pico", "latency_ms", "status",
    "error_code", "stream", "attempts",
)
"""The usage view's fields, in export order. The client IP is personal data and never shown."""


def usage_json(row: UsageRecord) -> dict[str, Any]:
    return {
        "object": "usage_record", "request_id": row.request_id, "ts": iso(row.ts), "endpoint": row.endpoint,
        "model": row.model, "provider": row.provider, "upstream_model": row.upstream_model,
        "account_id": row.account_id, "org_id": row.org_id, "key_id": row.key_id, "key_prefix": row.key_prefix,
        "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
        "cached_tokens": row.cached_tokens, "usage_estimated": row.usage_estimated,
        **money("estimated_cost", row.estimated_cost_pico), **money("actual_cost", row.actual_cost_pico),
        "latency_ms": row.latency_ms, "status": row.status, "error_code": row.error_code, "stream": row.stream,
        "attempts": row.attempts,
    }


def usage_total_json(total: UsageTotal, group_by: str) -> dict[str, Any]:
    return {"object": "usage_total", "group_by": group_by, "group": total.group, "requests": total.requests,
            "prompt_tokens": total.prompt_tokens, "completion_tokens": total.completion_tokens,
            **money("cost", total.cost_pico)}


# ---------------------------------------------------------------- accounts


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    type: str
    """"user" or "organization"."""
    name: str | None


async def find_account(store: Store, account_id: str) -> Account | None:
    """The user (deleted ones too: their money history stays) or organization with this id."""
    if not account_id.startswith("org_"):
        user = await store.get_user(account_id)
        if user is not None:
            return Account(user.id, "user", user.name or user.email)
    if not account_id.startswith("usr_"):
        org = await store.get_org(account_id)
        if org is not None:
            return Account(org.id, "organization", org.name)
    return None


def parse_time(value: str) -> datetime:
    """ISO-8601: a date (UTC midnight) or a date-time with a timezone. ValueError says what is wrong."""
    text = value.strip().replace(" ", "+")  # an unencoded '+' in a query string arrives as a space
    try:
        if len(text) == 10:
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("must be an ISO-8601 date or date-time with a timezone, e.g. 2025-01-31T00:00:00Z") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("needs a timezone, e.g. 2025-01-31T00:00:00Z")
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError("is out of range (years 1 to 9999 in UTC)") from None


# ---------------------------------------------------------------- statements


def parse_month(text: str) -> tuple[datetime, datetime]:
    """``YYYY-MM`` -> [first instant, first instant of the next month), UTC. ValueError otherwise."""
    match = _MONTH.fullmatch(text)
    if match is None:
        raise ValueError("must be a month as YYYY-MM, e.g. 2025-01")
    year, month = int(match.group(1)), int(match.group(2))
    if not 1 <= month <= 12 or not 1970 <= year <= 9998:
        raise ValueError("must be a month as YYYY-MM between 1970-01 and 9998-12, e.g. 2025-01")
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


@dataclass(frozen=True, slots=True)
class StatementLine:
    date: datetime
    """When it was booked; for summed request debits, the last one of the day."""
    kind: str
    source: str
    description: str | None
    amount_pico: int
    count: int = 1
    """How many requests (a day's request debits) or ledger entries (1) this line sums."""
    entry_id: int | None = None
    external_id: str | None = None


@dataclass(frozen=True, slots=True)
class Statement:
    account: Account
    month: str
    start: datetime
    end: datetime
    opening_pico: int
    closing_pico: int
    lines: tuple[StatementLine, ...]
    """Oldest first."""
    usage_by_model: tuple[UsageTotal, ...]
    generated_at: datetime
    credits_pico: int = field(init=False)
    debits_pico: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "credits_pico", sum(x.amount_pico for x in self.lines if x.amount_pico > 0))
        object.__setattr__(self, "debits_pico", sum(x.amount_pico for x in self.lines if x.amount_pico < 0))

    @property
    def final(self) -> bool:
        """The month is over: nothing can be booked into it any more."""
        return self.generated_at >= self.end


class FutureMonth(ValueError):
    """A statement of a month that has not begun: there is nothing to state yet."""


async def build_statement(store: Store, account: Account, month: str, *, now: datetime | None = None) -> Statement:
    """The account's statement for ``month`` (YYYY-MM). ValueError for a malformed month, FutureMonth for one
    that has not begun (the month in progress is provisional)."""
    start, end = parse_month(month)
    now = now or datetime.now(UTC)
    if start > now:
        raise FutureMonth(f"{month} has not begun: statements cover the months up to the current one "
                          f"({now.strftime('%Y-%m')}, provisional until it ends)")
    # One snapshot: the balance, the newest entry it includes (`head`: entries booked later are
    # left out of every read below) and the request debits summed per day (count: requests).
    balance, head, debit_days = await store.ledger_snapshot(account.id, since=start)
    last_day = end.date().isoformat()
    usage_days = [d for d in debit_days if d.day < last_day]
    after_month = sum(d.amount_pico for d in debit_days if d.day >= last_day) + sum(
        d.amount_pico for d in await store.ledger_days(account.id, since=end, up_to_id=head, without_request_debits=True))
    entries: list[LedgerEntry] = []
    last: tuple[datetime, int] | None = None
    offset = 0
    # Newest first. Entries booked meanwhile can shift the pages, so rows already seen (not
    # older than the last one) are skipped.
    while True:
        page = await store.list_ledger(account.id, since=start, until=end, without_request_debits=True, limit=PAGE,
                                       offset=offset)
        for entry in page:
            key = (entry.created_at, entry.id)
            if entry.id > head or (last is not None and key >= last):
                continue
            last = key
            entries.append(entry)
        if len(page) < PAGE:
            break
        offset += PAGE
    lines = [StatementLine(e.created_at, e.kind, e.source, shown_description(e), e.amount_pico, 1, e.id, e.external_id)
             for e in entries]
    lines += [StatementLine(d.last_at, "debit", REQUEST_SOURCE,
                            f"Usage charges, {d.day} ({d.count} request{'s' * (d.count != 1)})", d.amount_pico, d.count)
              for d in usage_days]
    lines.sort(key=lambda line: (line.date, line.entry_id or 0))
    closing = balance - after_month
    opening = closing - sum(line.amount_pico for line in lines)
    usage = await store.usage_totals(account_id=account.id, since=start, until=end, group_by="model")
    return Statement(account=account, month=month, start=start, end=end, opening_pico=opening,
                     closing_pico=closing, lines=tuple(lines), usage_by_model=tuple(usage), generated_at=now)


def statement_json(statement: Statement) -> dict[str, Any]:
    s = statement
    return {
        "object": "statement",
        "account_id": s.account.id, "account_type": s.account.type, "account_name": s.account.name,
        "month": s.month, "period_start": iso(s.start), "period_end": iso(s.end), "currency": "usd",
        **money("opening_balance", s.opening_pico), **money("credits", s.credits_pico),
        **money("debits", s.debits_pico), **money("closing_balance", s.closing_pico),
        "transactions": [{
            "date": iso(x.date), "kind": x.kind, "source": x.source, "description": x.description,
            **money("amount", x.amount_pico), "count": x.count, "id": x.entry_id, "external_id": x.external_id,
        } for x in s.lines],
        "usage_by_model": [usage_total_json(t, "model") for t in s.usage_by_model],
        "generated_at": iso(s.generated_at), "final": s.final,
    }


# --------------------------------------------------------------------- HTML


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _usd(pico: int) -> str:
    text = format_usd(abs(pico))
    whole, _, fraction = text.partition(".")
    fraction = (fraction + "00")[: max(2, len(fraction))]
    return f"{'-' if pico < 0 else ''}${int(whole):,}.{fraction}"


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#111;margin:2rem auto;max-width:60rem;
padding:0 1rem}
h1{font-size:1.5rem;margin:0 0 .25rem}h2{font-size:1.1rem;margin:2rem 0 .5rem}
.muted{color:#555}table{border-collapse:collapse;width:100%}
th,td{padding:.35rem .5rem;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.summary td{border:0;padding:.2rem .5rem}.summary tr.total td{border-top:2px solid #111;font-weight:600}
@media print{body{margin:0;max-width:none}a{color:inherit}}
"""


def render_statement_html(statement: Statement) -> str:
    """A self-contained, printable page; every value is HTML-escaped."""
    s = statement
    who = f"{s.account.name} ({s.account.id})" if s.account.name else s.account.id
    rows = []
    for x in s.lines:
        rows.append(
            f"<tr><td>{_e(iso(x.date))}</td><td>{_e(x.kind)}</td><td>{_e(x.description or x.source)}</td>"
            f"<td>{_e(x.external_id or '')}</td><td class=num>{_e(_usd(x.amount_pico))}</td></tr>")
    transactions = "\n".join(rows) or "<tr><td colspan=5 class=muted>No transactions this month.</td></tr>"
    usage_rows = [
        f"<tr><td>{_e(t.group or '(none)')}</td><td class=num>{t.requests:,}</td><td class=num>{t.prompt_tokens:,}</td>"
        f"<td class=num>{t.completion_tokens:,}</td><td class=num>{_e(_usd(t.cost_pico))}</td></tr>"
        for t in s.usage_by_model]
    usage = "\n".join(usage_rows) or "<tr><td colspan=5 class=muted>No usage this month.</td></tr>"
    status = "Final" if s.final else "Month in progress: provisional"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Statement {_e(s.month)} &ndash; {_e(who)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Statement for {_e(s.month)}</h1>
<p class="muted">Account: {_e(who)} &middot; {_e(s.account.type)}<br>
Period: {_e(iso(s.start))} to {_e(iso(s.end))} (UTC, end exclusive)<br>
{_e(status)} &middot; generated {_e(iso(s.generated_at))}</p>

<h2>Summary</h2>
<table class="summary">
<tr><td>Opening balance</td><td class=num>{_e(_usd(s.opening_pico))}</td></tr>
<tr><td>Credits</td><td class=num>{_e(_usd(s.credits_pico))}</td></tr>
<tr><td>Debits</td><td class=num>{_e(_usd(s.debits_pico))}</td></tr>
<tr class="total"><td>Closing balance</td><td class=num>{_e(_usd(s.closing_pico))}</td></tr>
</table>

<h2>Transactions</h2>
<table>
<thead><tr><th>Date (UTC)</th><th>Kind</th><th>Description</th><th>Reference</th><th class=num>Amount</th></tr></thead>
<tbody>
{transactions}
</tbody>
</table>

<h2>Usage by model</h2>
<table>
<thead><tr><th>Model</th><th class=num>Requests</th><th class=num>Input tokens</th><th class=num>Output tokens</th>
<th class=num>Cost</th></tr></thead>
<tbody>
{usage}
</tbody>
</table>
<p class="muted">Amounts in US dollars. Exact amounts (to the pico-dollar) are in the JSON statement.</p>
</body>
</html>
"""


def usage_csv_row(row: UsageRecord) -> list[Any]:
    view = usage_json(row)
    return ["" if view[c] is None else view[c] for c in USAGE_CSV_COLUMNS]


__all__ = [
    "Account", "Statement", "StatementLine", "USAGE_CSV_COLUMNS", "balance_json", "build_statement", "find_account",
    "iso", "money", "parse_month", "parse_time", "render_statement_html", "statement_json", "transaction_json",
    "usage_csv_row", "usage_json", "usage_total_json",
]
