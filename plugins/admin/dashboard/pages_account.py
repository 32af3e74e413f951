"""The pages of one account: overview, usage (and its download), credits, statements and invoices.

Which account: ``?account=`` with the admin API's own rule (``api._account``): your own by default,
an organization's for its admins and owners (403 for plain members, 404 for outsiders), any for the
operator. Every figure comes from the store calls the admin API's money endpoints make.
"""

from __future__ import annotations

import csv
import hashlib
import base64
import io
import json
import re
from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web

from nexgate_proxy.appkeys import STORE
from nexgate_proxy.store import LedgerEntry, StatusFilter, UsageRecord
from nexgate_plugins.usage_log import ROLLUP
from nexgate_plugins.usage_log.rollup import rollup_before
from nexgate_plugins.credits.statements import (
    USAGE_CSV_COLUMNS, build_statement, parse_month, render_statement_html, usage_csv_row, usage_json,
)

from .. import api
from .charts import days_back, stacked_bars
from .common import DASHBOARD, Cursor, accounts_of, base, keyset, redirect, secure_headers
from .markup import Safe, html, join
from .session import Session
from .views import day, page, table, url, usd, when

PAGE_ROWS = 50
INVOICE_SCAN = 1000
"""Ledger entries other than request debits the invoice list reads at most per page."""
LATENCY_SAMPLE = 200
"""p50/p95 over the latest requests of the month: each row read costs, a sample this size is enough."""
TOP_MODELS = 5
STATUSES = {"": "any status", "ok": "succeeded (2xx)", "error": "failed (4xx/5xx)", "402": "402 out of credits",
            "429": "429 rate limited"}
_STATUS_FILTERS: dict[str, StatusFilter | None] = {"": None, "ok": range(200, 300), "error": range(400, 1000),
                                                   "402": 402, "429": 429}
"""What each choice asks list_usage for: the store filters in SQL."""


async def _account(request: web.Request, session: Session) -> api.Account:
    if session.caller.superadmin and "account" not in request.query:
        raise redirect(f"{base(request)}/operator")
    return await api._account(request, session.caller)


def _frame(request: web.Request, session: Session, title: str, body: Safe, active: str, accounts: list[Any],
           account: api.Account) -> web.Response:
    label = "" if account.type == "user" and not session.caller.superadmin else \
        html('<p class="muted">Account: {n} ({i})</p>', n=account.name or "", i=account.id)
    return page(base(request), session, title, html("{l}{b}", l=label, b=body), active=active, accounts=accounts,
                account=account.id)


def _acct_q(request: web.Request, account: api.Account) -> str | None:
    return account.id if "account" in request.query else None


# ------------------------------------------------------------------ overview


async def overview(request: web.Request, session: Session) -> web.Response:
    account = await _account(request, session)
    store = request.app[STORE]
    span = 90 if request.query.get("days") == "90" else 30
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).date().isoformat()
    days = days_back(now.date(), span)
    first = days[0]
    balance = await store.get_balance(account.id)
    # this month's totals need the month's days too, when they are more than the span's
    cells = {(day_, t.group): (t.requests, t.prompt_tokens, t.completion_tokens, t.cost_pico)
             for day_, t in await store.usage_by_day_and_model(
                 account_id=account.id, since=date.fromisoformat(min(first, month_start)))}
    by_model: dict[str, list[int]] = {}
    month: dict[str, list[int]] = {}
    for (day_, model), cell in cells.items():
        if day_ >= first:
            _add(by_model, model, cell)
        if day_ >= month_start:
            _add(month, model, cell)
    top = sorted(by_model, key=lambda m: (-by_model[m][0], m))[:TOP_MODELS]
    series: dict[str, dict[str, dict[str, int]]] = {name: {} for name in _MEASURES}
    for (day_, model), cell in cells.items():
        if day_ < first:
            continue
        label = (model or "(none)") if model in top else "other"
        for name, measure in _MEASURES.items():
            line = series[name].setdefault(label, {})
            line[day_] = line.get(day_, 0) + measure(cell)
    order = [m or "(none)" for m in top] + ["other"]  # one colour per model in every chart: most used first
    for name in series:
        series[name] = {label: series[name][label] for label in order if label in series[name]}
    sample = await store.list_usage(account_id=account.id, since=datetime.fromisoformat(month_start).replace(
        tzinfo=UTC), limit=LATENCY_SAMPLE)
    p50, p95 = _percentile(sample, 50), _percentile(sample, 95)
    requests = sum(v[0] for v in month.values())
    tokens = sum(v[1] + v[2] for v in month.values())
    spend = sum(v[3] for v in month.values())
    acct = _acct_q(request, account)
    cards = html(
        '<section class="cards" aria-label="This month">'
        '<div class="card"><h2>Balance</h2><p class="big">{bal}</p><a href="{credits}">Buy credits</a></div>'
        '<div class="card"><h2>Spend this month</h2><p class="big">{spend}</p></div>'
        '<div class="card"><h2>Requests this month</h2><p class="big">{req:,}</p><p class="muted">{tok:,} tokens</p></div>'
        '<div class="card"><h2>Latency</h2><p class="big">{p50}</p><p class="muted">p50 · p95 {p95} '
        '(latest {n:,} requests this month)</p></div></section>',
        bal=usd(balance), credits=url(f"{base(request)}/credits", account=acct), spend=usd(spend), req=requests,
        tok=tokens, p50=_ms(p50), p95=_ms(p95), n=len(sample))
    empty = Safe("")
    if not by_model:
        empty = html('<section class="notice"><h2>No requests in the last {n} days</h2><p>Create an API key on the '
                     '<a href="{b}/keys">API keys</a> page and point any OpenAI SDK at this gateway\'s '
                     '<code>/v1</code>; your requests, tokens and spend appear here within seconds.</p></section>',
                     n=span, b=base(request))
    switch = html('<p class="tabs">Last <a href="{a}"{c30}>30 days</a> · <a href="{b}"{c90}>90 days</a></p>',
                  a=url(f"{base(request)}/overview", account=acct),
                  b=url(f"{base(request)}/overview", account=acct, days=90),
                  c30=Safe(' aria-current="true"') if span == 30 else Safe(""),
                  c90=Safe(' aria-current="true"') if span == 90 else Safe(""))
    charts = join([stacked_bars("Requests per day", days, series["requests"], lambda v: f"{v:,}"),
                   stacked_bars("Tokens per day", days, series["tokens"], lambda v: f"{v:,}"),
                   stacked_bars("Spend per day", days, series["spend"], usd)])
    models = table(("Model", "Requests", "Input tokens", "Output tokens", "Spend"),
                   [(m or "(none)", f"{v[0]:,}", f"{v[1]:,}", f"{v[2]:,}", usd(v[3]))
                    for m, v in sorted(month.items())], "No usage this month yet.", numeric=(1, 2, 3, 4))
    body = html('{cards}{empty}{switch}<section class="charts">{charts}</section>'
                '<h2>This month by model</h2>{models}', cards=cards, empty=empty, switch=switch, charts=charts,
                models=models)
    return _frame(request, session, "Overview", body, "overview", await accounts_of(request, session), account)


def _add(into: dict[str, list[int]], model: str, cell: tuple[int, int, int, int]) -> None:
    total = into.setdefault(model, [0, 0, 0, 0])
    for i, value in enumerate(cell):
        total[i] += value


_MEASURES = {
    "requests": lambda c: c[0],
    "tokens": lambda c: c[1] + c[2],
    "spend": lambda c: c[3],
}


def _percentile(rows: list[UsageRecord], pct: int) -> int | None:
    values = sorted(r.latency_ms for r in rows)
    if not values:
        return None
    return values[min(len(values) - 1, (len(values) * pct + 99) // 100 - 1)]


def _ms(value: int | None) -> str:
    return "–" if value is None else f"{value:,} ms"


# ------------------------------------------------------------------ usage


async def _usage_page(request: web.Request, account: api.Account, cursor: Cursor | None, limit: int) -> Any:
    filters = api._usage_filters(request)  # the admin API's own checks of since/until/model/key_id
    status = request.query.get("status", "")
    if status not in STATUSES:
        raise api.bad("status", "'status' must be one of ok, error, 402, 429.")
    store = request.app[STORE]

    async def fetch(until: datetime | None, n: int, offset: int) -> list[UsageRecord]:
        return await store.list_usage(account_id=account.id, since=filters["since"], until=until,
                                      model=filters["model"], key_id=filters["key_id"],
                                      status=_STATUS_FILTERS[status], limit=n, offset=offset)

    return await keyset(fetch, lambda r: (r.ts, r.request_id), filters["until"], cursor, limit, batch=limit)


async def usage(request: web.Request, session: Session) -> web.Response:
    account = await _account(request, session)
    cursor = Cursor.parse(request.query.get("after"))
    result = await _usage_page(request, account, cursor, PAGE_ROWS)
    acct = _acct_q(request, account)
    q = request.query
    keys = await request.app[STORE].list_api_keys(
        **({"user_id": account.id} if account.type == "user" else {"org_id": account.id}), include_revoked=True)
    key_options = join(html('<option value="{v}"{s}>{n}</option>', v=k.id, n=f"{k.prefix} {k.name}",
                            s=Safe(" selected") if q.get("key_id") == k.id else Safe("")) for k in keys)
    status_options = join(html('<option value="{v}"{s}>{n}</option>', v=v, n=n,
                               s=Safe(" selected") if q.get("status", "") == v else Safe(""))
                          for v, n in STATUSES.items())
    filters = html(
        '<form method="get" class="filters" action="{b}/usage">{acct}'
        '<label>From <input type="date" name="since" value="{since}"></label>'
        '<label>Before <input type="date" name="until" value="{until}"></label>'
        '<label>Key <select name="key_id"><option value="">any key</option>{keys}</select></label>'
        '<label>Model <input name="model" value="{model}" placeholder="any model"></label>'
        '<label>Status <select name="status">{statuses}</select></label>'
        '<button type="submit">Filter</button></form>',
        b=base(request), acct=html('<input type="hidden" name="account" value="{a}">', a=acct) if acct else Safe(""),
        since=q.get("since", ""), until=q.get("until", ""), keys=key_options, model=q.get("model", ""),
        statuses=status_options)
    rows = [(when(r.ts), r.model or "–", r.key_prefix or "–", f"{r.prompt_tokens:,}", f"{r.completion_tokens:,}",
             usd(r.estimated_cost_pico), usd(r.actual_cost_pico) + (" (est. tokens)" if r.usage_estimated else ""),
             f"{r.latency_ms:,} ms", f"{r.status}" + (f" {r.error_code}" if r.error_code else ""))
            for r in result.rows]
    grid = table(("Time", "Model", "Key", "Input", "Output", "Held", "Charged", "Latency", "Status"), rows,
                 "No requests match. Requests appear here a second or so after they finish.", numeric=(3, 4, 5, 6, 7))
    keep = {k: v for k, v in q.items() if k in ("account", "since", "until", "model", "key_id", "status")}
    nav = Safe("")
    if result.next is not None:
        nav = html('<p class="pager"><a href="{u}" rel="next">Older requests →</a></p>',
                   u=url(f"{base(request)}/usage", **keep, after=result.next.text()))
    downloads = html('<p class="downloads">Download these filters: <a href="{c}" download>CSV</a> · '
                     '<a href="{j}" download>JSON</a> (metadata only: there is no prompt or completion content).</p>',
                     c=url(f"{base(request)}/usage/export", **keep, format="csv"),
                     j=url(f"{base(request)}/usage/export", **keep, format="json"))
    body = html("{f}{d}{r}{g}{n}", f=filters, d=downloads, r=_rolled_up_note(request), g=grid, n=nav)
    return _frame(request, session, "Usage", body, "usage", await accounts_of(request, session), account)


def _rolled_up_note(request: web.Request) -> Safe:
    """With usage.rollup_after_days on, older days have totals but no request rows: say so, or the
    list would look like those requests never happened."""
    rollup = request.app.get(ROLLUP)
    if rollup is None:
        return Safe("")
    return html('<p class="muted">Requests before {d} are kept as daily totals only (this gateway keeps '
                'request rows for {n} days): the overview, statements and the data export still count them; '
                'this list starts on {d}.</p>', d=rollup_before(rollup.days).isoformat(), n=rollup.days)


async def usage_export(request: web.Request, session: Session) -> web.StreamResponse:
    account = await _account(request, session)
    fmt = request.query.get("format", "csv")
    if fmt not in ("csv", "json"):
        raise api.bad("format", "'format' must be csv or json.")
    first = await _usage_page(request, account, None, 1000)
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/json",
        "Content-Disposition": f'attachment; filename="nexgate-usage-{account.id}.{fmt}"'})
    secure_headers(response)
    await response.prepare(request)
    page_ = first
    written = 0
    if fmt == "json":
        await response.write(b'{"object": "list", "data": [')
    while True:
        out = io.StringIO()
        if fmt == "csv":
            writer = csv.writer(out, lineterminator="\r\n")
            if written == 0:
                writer.writerow(USAGE_CSV_COLUMNS)
            for row in page_.rows:
                writer.writerow(usage_csv_row(row))
        else:
            for i, row in enumerate(page_.rows):
                out.write(("\n" if written + i == 0 else ",\n") + json.dumps(usage_json(row)))
        written += len(page_.rows)
        await response.write(out.getvalue().encode("utf-8"))
        if page_.next is None:
            break
        page_ = await _usage_page(request, account, page_.next, 1000)
    if fmt == "json":
        await response.write(b"\n]}\n")
    await response.write_eof()
    return response


# ------------------------------------------------------------------ credits


def _ledger_key(entry: LedgerEntry) -> tuple[datetime, str]:
    return entry.created_at, f"{entry.id:020d}"


async def credits(request: web.Request, session: Session) -> web.Response:
    account = await _account(request, session)
    store = request.app[STORE]
    balance = await store.get_balance(account.id)
    cursor = Cursor.parse(request.query.get("after"))

    async def fetch(until: datetime | None, n: int, offset: int) -> list[LedgerEntry]:
        return await store.list_ledger(account.id, until=until, limit=n, offset=offset)

    result = await keyset(fetch, _ledger_key, None, cursor, PAGE_ROWS, batch=PAGE_ROWS)
    acct = _acct_q(request, account)
    rows = []
    for e in result.rows:
        ref: Any = e.external_id if e.source != "request" else (e.request_id or "")
        if e.kind == "payment":
            ref = html('{r} · <a href="{u}">Invoice</a>', r=e.external_id,
                       u=url(f"{base(request)}/invoice", account=acct, source=e.source, ref=e.external_id))
        rows.append((when(e.created_at), e.kind, e.description or e.source, ref, usd(e.amount_pico)))
    grid = table(("Date", "Kind", "Description", "Reference", "Amount"), rows,
                 "No transactions yet. Credits you buy or are granted appear here.", numeric=(4,))
    pager = Safe("")
    if result.next is not None:
        pager = html('<p class="pager"><a href="{u}" rel="next">Older transactions →</a></p>',
                     u=url(f"{base(request)}/credits", account=acct, after=result.next.text()))
    body = html('<section class="cards"><div class="card"><h2>Balance</h2><p class="big">{b}</p></div></section>'
                '{buy}<h2>Transactions</h2>{g}{p}', b=usd(balance), buy=_buy(request, account), g=grid, p=pager)
    return _frame(request, session, "Credits", body, "credits", await accounts_of(request, session), account)


def _buy(request: web.Request, account: api.Account) -> Safe:
    settings = request.app[DASHBOARD]
    explain = html('<p class="muted">Requests are paid from this balance before they are sent upstream. When it '
                   'cannot cover a request\'s worst-case cost, the gateway answers <strong>402 '
                   'insufficient_credits</strong> and nothing is charged: buy credits (or ask the operator for a '
                   'grant) and retry.</p>')
    if not settings.checkout:
        return html('<h2>Buy credits</h2>{e}<p class="empty">The operator has not set up online payments. Ask them '
                    'for credits.</p>', e=explain)
    from nexgate_plugins.payments import PAYMENTS
    payments = request.app.get(PAYMENTS)
    dodo = payments.dodopayments if payments is not None else None
    key = dodo.account_metadata_key if dodo is not None else "nexgate_account_id"
    back = f"{request.scheme}://{request.host}{base(request)}/credits"
    links = []
    for link in settings.checkout:
        sep = "&" if "?" in link.url else "?"
        target = link.url + sep + _urlencode({"quantity": "1", f"metadata_{key}": account.id, "redirect_url": back})
        credit = dodo.products.get(link.product_id) if dodo is not None else None
        links.append(html('<li><a class="button" href="{u}" rel="noopener">{l}</a>{c}</li>', u=target, l=link.label,
                          c=html(' <span class="muted">{v} of credits</span>', v=usd(credit)) if credit else Safe("")))
    return html('<h2>Buy credits</h2>{e}<ul class="buy">{l}</ul><p class="muted">Checkout is handled by '
                'DodoPayments; your balance rises when the payment succeeds.</p>', e=explain, l=join(links))


def _urlencode(values: dict[str, str]) -> str:
    from urllib.parse import urlencode
    return urlencode(values)


# ------------------------------------------------------------------ statements and invoices

STATEMENT_CSP = ("default-src 'none'; style-src {h} 'self'; img-src 'self'; form-action 'none'; "
                 "frame-ancestors 'none'; base-uri 'none'")
_STYLE = re.compile(r"<style>(.*?)</style>", re.S)


def _style_hashes(document: str) -> str:
    """The statement page's own inline style, allowed by its hash (and nothing else inline)."""
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                    for m in _STYLE.findall(document))


async def statements(request: web.Request, session: Session) -> web.Response:
    account = await _account(request, session)
    acct = _acct_q(request, account)
    now = datetime.now(UTC)
    months = []
    year, month = now.year, now.month
    for _ in range(12):
        months.append(f"{year:04d}-{month:02d}")
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    rows = [(html('<a href="{u}">{m}</a>', u=url(f"{base(request)}/statements/{m}", account=acct), m=m),
             "in progress" if i == 0 else "final",
             html('<a href="{h}" download>HTML</a> · <a href="{j}" download>JSON</a>',
                  h=url(f"{base(request)}/statements/{m}", account=acct, download=1),
                  j=url(f"{base(request)}/statements/{m}", account=acct, format="json")))
            for i, m in enumerate(months)]
    store = request.app[STORE]

    async def fetch(until: datetime | None, n: int, offset: int) -> list[LedgerEntry]:
        return await store.list_ledger(account.id, until=until, without_request_debits=True, limit=n, offset=offset)

    found = await keyset(fetch, _ledger_key, None, Cursor.parse(request.query.get("after")), PAGE_ROWS,
                         keep=lambda e: e.kind == "payment", scan=INVOICE_SCAN, batch=500)
    payments = found.rows
    older = Safe("") if found.next is None else html(
        '<p class="pager"><a href="{u}" rel="next">Look for older invoices →</a></p>',
        u=url(f"{base(request)}/statements", account=acct, after=found.next.text()))
    prefix = request.app[DASHBOARD].business.invoice_prefix
    invoices = [(html('<a href="{u}">{n}</a>', n=f"{prefix}{e.id:06d}",
                      u=url(f"{base(request)}/invoice", account=acct, source=e.source, ref=e.external_id)),
                 day(e.created_at), e.description or "", usd(e.amount_pico)) for e in payments]
    body = html('<h2>Monthly statements</h2><p class="muted">Opening balance, every transaction and the closing '
                'balance of one UTC month; request charges summed per day.</p>{s}<h2>Invoices</h2>'
                '<p class="muted">One numbered invoice per payment.</p>{i}',
                s=table(("Month", "Status", "Download"), rows, ""),
                i=html("{t}{o}", t=table(("Invoice", "Date", "Payment", "Credits"), invoices, "No payments yet: "
                                         "invoices appear here when you buy credits.", numeric=(3,)), o=older))
    return _frame(request, session, "Statements and invoices", body, "statements",
                  await accounts_of(request, session), account)


async def statement(request: web.Request, session: Session) -> web.StreamResponse:
    month = request.match_info["month"]
    try:
        parse_month(month)
    except ValueError as exc:
        raise api.bad("month", f"The statement period {exc}.") from None
    account = await _account(request, session)
    built = await build_statement(request.app[STORE], account, month)
    if request.query.get("format") == "json":
        from nexgate_plugins.credits.statements import statement_json
        return web.json_response(statement_json(built), headers={
            "Content-Disposition": f'attachment; filename="statement-{account.id}-{month}.json"'})
    document = render_statement_html(built)
    response = web.Response(text=document, content_type="text/html", charset="utf-8")
    response.headers["Content-Security-Policy"] = STATEMENT_CSP.format(h=_style_hashes(document))
    if request.query.get("download"):
        response.headers["Content-Disposition"] = f'attachment; filename="statement-{account.id}-{month}.html"'
    return response


_PAID = re.compile(r"; paid (\d{1,18}) ([A-Z]{3})$")


async def invoice(request: web.Request, session: Session) -> web.Response:
    account = await _account(request, session)
    source, ref = request.query.get("source", ""), request.query.get("ref", "")
    entry = await request.app[STORE].get_ledger_entry(source, ref) if source and ref and len(ref) < 300 else None
    if entry is None or entry.account_id != account.id or entry.kind != "payment":
        raise api.not_found("invoice")
    settings = request.app[DASHBOARD]
    biz = settings.business
    number = f"{biz.invoice_prefix}{entry.id:06d}"
    paid = _PAID.search(entry.description or "")
    paid_text = f"{int(paid.group(1)) / 100:,.2f} {paid.group(2)}" if paid else usd(entry.amount_pico)
    seller = join([html("<strong>{n}</strong>", n=biz.name or "(operator name not configured)"),
                   *[html("<br>{l}", l=line) for line in biz.address],
                   html("<br>Tax id: {t}", t=biz.tax_id) if biz.tax_id else Safe(""),
                   html("<br>{e}", e=biz.email) if biz.email else Safe("")])
    body = html(
        '<article class="invoice"><header><div>{seller}</div><div class="num"><h2>Invoice {no}</h2>'
        '<p>Date: {date}<br>Payment reference: {ref}</p></div></header>'
        '<p><strong>Bill to</strong><br>{who}<br>Account {id}</p>'
        '<table><thead><tr><th>Description</th><th class="num">Amount</th></tr></thead><tbody>'
        '<tr><td>Prepaid API credits: {desc}</td><td class="num">{credit}</td></tr></tbody>'
        '<tfoot><tr><td>Total paid</td><td class="num">{paid}</td></tr></tfoot></table>'
        '<p class="muted">Credits are prepaid usage of the NexGate gateway. Paid through DodoPayments, the merchant '
        'of record, whose receipt shows any taxes.</p></article>'
        '<p class="noprint"><button type="button" data-print>Print or save as PDF</button> · '
        '<a href="{dl}" download>Download</a></p>',
        seller=seller, no=number, date=day(entry.created_at), ref=entry.external_id, who=account.name or "",
        id=account.id, desc=_PAID.sub("", entry.description or ""), credit=usd(entry.amount_pico), paid=paid_text,
        dl=url(f"{base(request)}/invoice", account=request.query.get("account"), source=source, ref=ref, download=1))
    response = _frame(request, session, f"Invoice {number}", body, "statements", [], account)
    if request.query.get("download"):
        response.headers["Content-Disposition"] = f'attachment; filename="invoice-{number}.html"'
    return response
