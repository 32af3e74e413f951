"""Operator commands for money: ``nexgate credits grant|balance`` and ``nexgate usage export``.

``register(subparsers)`` adds them to the ``nexgate`` command. Same
conventions as ``nexgate_proxy.cli_admin``: ``--config PATH`` or
``--storage-url URL``, ``--json``, one-line errors with exit code 1.

* ``credits grant ACCOUNT USD --reason TEXT [--ref ID]`` books a ``grant``
  ledger entry (source ``admin``); ``credits adjust`` books a signed
  ``adjustment``. USD is a plain decimal (``1e3`` is refused). With ``--ref``
  it is idempotent: the same ref is applied once, however often the command
  runs; a ref already used for another account (or amount) is an error naming
  it. The admin API's ``POST /admin/v1/credits`` is the same (``grants``). Every running gateway
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
from datetime import UTC, datetime
from typing import IO, Any

from nexgate_proxy.clikit import CliError, Env, add_command, emit, option_parents
from nexgate_proxy.money import format_usd
from nexgate_proxy.store import Store

from .grants import Granted, GrantError, check_reason, check_ref, grant, parse_usd
from .holds import open_credit_state
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

EXPORT_PAGE = 1000


async def _account(store: Store, account_id: str) -> Account:
    account = await find_account(store, account_id.strip())
    if account is None:
        raise CliError(f"no such account: {account_id} (give a user or organization id)")
    return account


async def _book_grant(env: Env, store: Store, account: Account, amount: int, reason: str, ref: str | None,
                      kind: str) -> Granted:
    """Running gateways move a cached balance by it exactly once: with in-process state (memory://) their
    store feed brings it; with shared state (Redis) it is booked here through that state."""
    state = None
    if not env.state_url.startswith("memory:"):
        try:
            state = open_credit_state(env.state_url)
        except ValueError as exc:
            raise CliError(f"bad state URL: {exc}") from None
    try:
        done = await grant(store, state, account.id, amount, reason, ref, kind=kind)
    except GrantError as exc:
        raise _cli_error(exc) from None
    finally:
        if state is not None:
            await state.close()
    if not done.reached_state:  # the ledger has it; gateways catch up when they reload
        print("warning: the state store (state.url) did not answer: running gateways see the change when they "
              "next load this account's balance", file=sys.stderr)
    return done


def _cli_error(exc: GrantError) -> CliError:
    return CliError(exc.message if exc.field == "amount" else f"--{exc.field}: {exc.message}")


async def _credits_grant(env: Env, store: Store) -> int:
    args = env.args
    kind = "adjustment" if args.credits_command == "adjust" else "grant"
    try:
        amount = parse_usd(args.usd, signed=kind == "adjustment")
        reason = check_reason(args.reason)
        ref = check_ref(args.ref)
    except GrantError as exc:
        raise _cli_error(exc) from None
    account = await _account(store, args.account)
    done = await _book_grant(env, store, account, amount, reason, ref, kind)
    data = {"object": kind, "applied": done.applied, "account_id": account.id, "account_type": account.type,
            "external_id": done.entry.external_id, "reason": reason, **money("amount", amount),
            **money("balance", done.balance_pico)}
    what = "Granted" if kind == "grant" else "Adjusted by"
    if done.applied:
        human = f"{what} ${format_usd(amount)} to {account.id} ({reason}). Balance: ${format_usd(done.balance_pico)}"
    else:
        human = (f"The {kind} with ref {ref!r} to {account.id} was already applied: nothing changed. "
                 f"Balance of {account.id}: ${format_usd(done.balance_pico)}")
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

    credits = subparsers.add_parser("credits", help="prepaid credits: grant, adjust, balance")
    credits_sub = credits.add_subparsers(dest="credits_command", required=True, metavar="COMMAND")
    p = add_command(credits_sub, "grant", "grant credits to a user or organization (ledger kind 'grant')",
                    _credits_grant, with_state)
    p.add_argument("account", metavar="ACCOUNT", help="a user or organization id")
    p.add_argument("usd", metavar="USD", help="the amount in US dollars, e.g. 10 or 2.50")
    p.add_argument("--reason", required=True, help="why: shown on the account's statement")
    p.add_argument("--ref", metavar="ID", help="your reference: the same ref is granted once (idempotent); "
                                              "a ref already used for another account is an error")
    p = add_command(credits_sub, "adjust", "correct an account's balance by a signed amount (ledger kind "
                    "'adjustment')", _credits_grant, with_state)
    p.add_argument("account", metavar="ACCOUNT", help="a user or organization id")
    p.add_argument("usd", metavar="USD", help="the signed amount in US dollars, e.g. -2.50 or 10")
    p.add_argument("--reason", required=True, help="why: shown on the account's statement")
    p.add_argument("--ref", metavar="ID", help="your reference, shared with grants: applied once")
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
