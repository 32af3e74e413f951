"""Operator commands for payments held unapplied: ``nexgate payments unapplied|apply``.

A DodoPayments payment that names no account, or an unknown or deleted one, is credited to
nobody and held (see ``payments``). ``payments unapplied [--all]`` lists them (with ``--all``
the applied ones too); ``payments apply PAYMENT_ID ACCOUNT`` credits one to an account, once:
run again with the same account it changes nothing, with another it is an error naming the
first. Same conventions as the other store commands (``--json``, exit code 1 on errors).
"""

from __future__ import annotations

from typing import Any

from nexgate_plugins.credits.holds import open_credit_state
from nexgate_proxy.clikit import CliError, Env, add_command, emit, option_parents, table
from nexgate_proxy.money import format_usd
from nexgate_proxy.store import Store

from .payments import UnappliedError, apply_unapplied, unapplied_json


async def _unapplied(env: Env, store: Store) -> int:
    held = await store.list_unapplied_payments(include_applied=env.args.all, limit=10_000)
    rows = [unapplied_json(p) for p in held]
    open_pico = sum(p.amount_pico for p in held if p.applied_to is None)
    emit(env, {"object": "list", "data": rows}, [
        table(rows, [("payment_id", "PAYMENT"), ("credit_usd", "CREDIT USD"), ("account_hint", "NAMED"),
                     ("reason", "WHY HELD"), ("received_at", "RECEIVED"), ("applied_to", "APPLIED TO")]),
        f"{sum(1 for p in held if p.applied_to is None)} unapplied, ${format_usd(open_pico)} of credits"])
    return 0


async def _apply(env: Env, store: Store) -> int:
    state = None if env.state_url.startswith("memory:") else open_credit_state(env.state_url)
    try:
        applied, held = await apply_unapplied(store, state, env.args.payment_id.strip(), env.args.account.strip())
    except UnappliedError as exc:
        raise CliError(exc.message) from None
    finally:
        if state is not None:
            await state.close()
    balance = await store.get_balance(held.applied_to or "")
    if applied:
        human = (f"Applied payment {held.payment_id}: ${format_usd(held.amount_pico)} to {held.applied_to}. "
                 f"Balance: ${format_usd(balance)}")
    else:
        human = f"Payment {held.payment_id} was already applied to {held.applied_to}: nothing changed."
    emit(env, {**unapplied_json(held), "applied": applied, "balance_usd": format_usd(balance),
               "balance_pico": balance}, human)
    return 0


def register(subparsers: Any) -> None:
    common, with_state = option_parents("whose cached balances to update")
    payments = subparsers.add_parser("payments", help="payments held unapplied: list, apply")
    sub = payments.add_subparsers(dest="payments_command", required=True, metavar="COMMAND")
    p = add_command(sub, "unapplied", "list payments credited to nobody (no, unknown or deleted account)",
                    _unapplied, common)
    p.add_argument("--all", action="store_true", help="the applied ones too")
    p = add_command(sub, "apply", "credit a held payment to an account (once)", _apply, with_state)
    p.add_argument("payment_id", metavar="PAYMENT_ID", help="the DodoPayments payment id (pay_...)")
    p.add_argument("account", metavar="ACCOUNT", help="a user or organization id")
