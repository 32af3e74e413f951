"""Operator commands for money: ``nexgate credits grant|balance`` and ``nexgate usage export``.

``register(subparsers)`` adds them to the ``nexgate`` command. Same
conventions as ``nexgate_proxy.cli_admin``: ``--config PATH`` or
``--storage-url URL``, ``--json``, one-line errors with exit code 1.

* ``credits grant ACCOUNT USD --reason TEXT [--ref ID]`` books a ``grant``
  ledger entry (source ``admin``). With ``--ref`` it is idempotent: the same
  ref is applied once, however often the command runs. Every running gateway
  applies it to the balance it caches within a second: through the store's
  change feed, or, with a Redis state store (``state.url``), at once in Redis.
* ``credits balance ACCOUNT`` prints the balance, exact to the pico-dollar.
* ``usage export ACCOUNT --format csv|json [--since --until] [--output FILE]``
  writes the account's usage records (metadata only, no client IPs), newest
  first; to a file it writes atomically (a temporary file renamed at the end).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import IO, Any

from nexgate_proxy.clikit import CliError, Env, add_command, emit, option_parents
from nexgate_proxy.money import format_usd, usd_to_pico
from nexgate_proxy.store import MAX_PICO, NewLedgerEntry, Store

from .holds import nano_floor, open_credit_state
from .statements import (
    USAGE_CSV_COLUMNS,
    Account,
    balance_json,
    find_account,
    money,
    parse_time,
    usage_csv_row,
    usage_json,
)

GRANT_SOURCE = "admin"
MAX_REASON_LENGTH = 500
EXPORT_PAGE = 1000


async def _account(store: Store, account_id: str) -> Account:
    account = await find_account(store, account_id.strip())
    if account is None:
        raise CliError(f"no such account: {account_id} (give a user or organization id)")
    return account


def _usd(text: str) -> int:
    try:
        usd = Decimal(text.strip().removeprefix("$"))
    except InvalidOperation:
        raise CliError(f"{text!r} is not an amount in USD, e.g. 10 or 2.50") from None
    if not usd.is_finite() or usd <= 0:
        raise CliError(f"the amount must be greater than 0, got {text}")
    try:
        pico = usd_to_pico(usd)
    except ValueError:
        raise CliError(f"{text} USD is finer than a pico-dollar (at most 12 decimals)") from None
    if pico > MAX_PICO:
        raise CliError(f"{text} USD is more than a balance can hold")
    return pico


async def _book(env: Env, store: Store, entry: NewLedgerEntry) -> bool:
    """Apply the entry (True if it was new). Running gateways move a cached balance by it exactly once:
    with in-process state (memory://) their store feed brings it; with shared state (Redis) it is
    booked here through that state, whatever balance loads race it."""
    if env.state_url.startswith("memory:"):
        return await store.apply_ledger_entry(entry)
    try:
        state = open_credit_state(env.state_url)
    except ValueError as exc:
        raise CliError(f"bad state URL: {exc}") from None
    try:
        credited = await state.credit(entry.account_id, nano_floor(entry.amount_pico),
                                      lambda: store.apply_ledger_entry(entry))
    finally:
        await state.close()
    if credited.booked and not credited.reached_state:  # the ledger has it; gateways catch up when they reload
        print("warning: the state store (state.url) did not answer: running gateways see the change when they "
              "next load this account's balance", file=sys.stderr)
    return credited.booked


async def _credits_grant(env: Env, store: Store) -> int:
    args = env.args
    account = await _account(store, args.account)
    amount = _usd(args.usd)
    reason = args.reason.strip()
    if not reason:
        raise CliError("--reason must not be empty")
    if len(reason) > MAX_REASON_LENGTH or any(ord(c) < 0x20 for c in reason):
        raise CliError(f"--reason must be one line of at most {MAX_REASON_LENGTH} characters")
    ref = args.ref.strip() if args.ref is not None else None
    if ref is not None and not 0 < len(ref) <= 200:
        raise CliError("--ref must be 1 to 200 characters")
    external_id = f"grant:{ref}" if ref is not None else f"grant:{uuid.uuid4().hex}"
    applied = await _book(env, store, NewLedgerEntry(
        account_id=account.id, kind="grant", amount_pico=amount, source=GRANT_SOURCE, external_id=external_id,
        description=reason))
    balance = await store.get_balance(account.id)
    data = {"object": "grant", "applied": applied, "account_id": account.id, "account_type": account.type,
            "external_id": external_id, "reason": reason, **money("amount", amount), **money("balance", balance)}
    if applied:
        human = f"Granted ${format_usd(amount)} to {account.id} ({reason}). Balance: ${format_usd(balance)}"
    else:
        human = (f"A grant with ref {ref!r} was already applied: nothing changed. "
                 f"Balance of {account.id}: ${format_usd(balance)}")
    emit(env, data, human)
    return 0


async def _credits_balance(env: Env, store: Store) -> int:
    account = await _account(store, env.args.account)
    balance = await store.get_balance(account.id)
    who = f"{account.id} ({account.name})" if account.name else account.id
    emit(env, balance_json(account.id, account.type, balance),
         f"{who}: ${format_usd(balance)} ({balance} pico-USD)")
    return 0


def _time(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise CliError(f"{option} {exc}") from None


async def _write_usage(store: Store, account_id: str, since: datetime | None, until: datetime, fmt: str,
                       out: IO[str]) -> int:
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(USAGE_CSV_COLUMNS)
    else:
        out.write("[")
    seen: set[str] = set()
    offset = 0
    while True:
        # Rows flushed meanwhile can shift the pages: a row is never missed, and one seen twice is skipped.
        page = await store.list_usage(account_id=account_id, since=since, until=until, limit=EXPORT_PAGE,
                                      offset=offset)
        for row in page:
            if row.request_id in seen:
                continue
            seen.add(row.request_id)
            if writer is not None:
                writer.writerow(usage_csv_row(row))
            else:
                out.write(("\n" if len(seen) == 1 else ",\n") + json.dumps(usage_json(row)))
        if len(page) < EXPORT_PAGE:
            break
        offset += EXPORT_PAGE
    if writer is None:
        out.write("\n]\n" if seen else "]\n")
    return len(seen)


async def _usage_export(env: Env, store: Store) -> int:
    args = env.args
    account = await _account(store, args.account)
    since = _time(args.since, "--since")
    until = _time(args.until, "--until")
    if since is not None and until is not None and since >= until:
        raise CliError("--until must be after --since")
    # Requests started after this moment belong to the next export.
    until = until or datetime.now(UTC)
    if args.output in (None, "-"):
        await _write_usage(store, account.id, since, until, args.format, sys.stdout)
        sys.stdout.flush()
        return 0
    target = os.path.abspath(args.output)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise CliError(f"--output: the directory {directory} does not exist")
    fd, temporary = tempfile.mkstemp(prefix=".nexgate-export-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            count = await _write_usage(store, account.id, since, until, args.format, out)
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    emit(env, {"object": "usage_export", "account_id": account.id, "format": args.format, "records": count,
                "output": target},
         f"Exported {count} usage record(s) of {account.id} to {target}")
    return 0


# ------------------------------------------------------------------- parser


def register(subparsers: Any) -> None:
    """Add the credits and usage commands to the `nexgate` argparse subparsers."""
    common, with_state = option_parents("whose cached balances to update")

    credits = subparsers.add_parser("credits", help="prepaid credits: grant, balance")
    credits_sub = credits.add_subparsers(dest="credits_command", required=True, metavar="COMMAND")
    p = add_command(credits_sub, "grant", "grant credits to a user or organization (ledger kind 'grant')",
                    _credits_grant, with_state)
    p.add_argument("account", metavar="ACCOUNT", help="a user or organization id")
    p.add_argument("usd", metavar="USD", help="the amount in US dollars, e.g. 10 or 2.50")
    p.add_argument("--reason", required=True, help="why: shown on the account's statement")
    p.add_argument("--ref", metavar="ID", help="your reference: the same ref is granted once (idempotent)")
    p = add_command(credits_sub, "balance", "show an account's balance", _credits_balance, common)
    p.add_argument("account", metavar="ACCOUNT", help="a user or organization id")

    usage = subparsers.add_parser("usage", help="usage records")
    usage_sub = usage.add_subparsers(dest="usage_command", required=True, metavar="COMMAND")
    p = add_command(usage_sub, "export", "export an account's usage records (metadata only), newest first",
                    _usage_export, common)
    p.add_argument("account", metavar="ACCOUNT", help="a user or organization id")
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="csv (default) or json")
    p.add_argument("--since", metavar="ISO8601", help="from this time, inclusive (e.g. 2025-01-01 or ...T00:00:00Z)")
    p.add_argument("--until", metavar="ISO8601", help="until this time, exclusive (default: now)")
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE (default: standard output)")
