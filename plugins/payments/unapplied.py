"""Payments credited to nobody: held, shown to the operator, applied once (the payments plugin's own).

A DodoPayments payment that names no account, or an unknown or deleted one, is not credited:
``payments`` holds it here. The operator sees the held payments in ``nexgate payments unapplied
[--all]``, ``GET /admin/v1/payments/unapplied`` and the ``nexgate_payments_unapplied`` gauges,
and credits one to an account, once, with ``nexgate payments apply PAYMENT_ID ACCOUNT`` or
``POST /admin/v1/payments/unapplied/{payment_id}/apply`` (both ``apply_unapplied``): again with
the same account it changes nothing, with another it is an error naming the first.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from nexgate_plugins.credits.grants import book
from nexgate_plugins.credits.holds import CreditState, open_credit_state
from nexgate_plugins.credits.statements import find_account
from nexgate_proxy.clikit import CliError, Env, add_command, emit, option_parents, table
from nexgate_proxy.money import format_usd
from nexgate_proxy.store import Conflict, NewLedgerEntry, Store, UnappliedPayment

log = logging.getLogger("nexgate.payments")

SOURCE = "dodopayments"


async def why_not_credited(store: Store, account_id: str | None, key: str) -> str | None:
    """Why a payment naming ``account_id`` cannot be credited to it, or None when it can."""
    if account_id is None:
        return f"the payment names no account (metadata.{key})"
    if not account_id.startswith("org_"):
        user = await store.get_user(account_id)
        if user is not None:
            return f"account {account_id} was deleted" if user.deleted_at is not None else None
    if await find_account(store, account_id) is None:
        return f"account {account_id} does not exist"
    return None


class UnappliedError(Exception):
    """Applying a held payment failed: ``status`` 404 (no such payment or account) or 409 (applied elsewhere)."""

    def __init__(self, status: int, message: str, param: str) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def unapplied_json(payment: UnappliedPayment) -> dict[str, Any]:
    return {"object": "unapplied_payment", "source": payment.source, "payment_id": payment.payment_id,
            "account_hint": payment.account_hint, "credit_usd": format_usd(payment.amount_pico),
            "credit_pico": payment.amount_pico, "description": payment.description, "reason": payment.reason,
            "received_at": payment.received_at.isoformat().replace("+00:00", "Z"),
            "applied_to": payment.applied_to,
            "applied_at": payment.applied_at.isoformat().replace("+00:00", "Z") if payment.applied_at else None}


async def apply_unapplied(store: Store, state: CreditState | None, payment_id: str,
                          account_id: str) -> tuple[bool, UnappliedPayment]:
    """Credit a held payment to ``account_id``, once: (True, it) when applied now, (False, it) when it was
    applied to that account before. UnappliedError otherwise. The CLI and the admin API both use it."""
    held = await store.get_unapplied_payment(SOURCE, payment_id)
    if held is None:
        raise UnappliedError(404, f"No unapplied payment {payment_id}.", "payment_id")
    if held.applied_to is None:
        why = await why_not_credited(store, account_id, "account")
        if why is not None:
            raise UnappliedError(404, f"Cannot apply payment {payment_id}: {why}.", "account_id")
        entry = NewLedgerEntry(account_id=account_id, kind="payment", amount_pico=held.amount_pico, source=SOURCE,
                               external_id=f"payment:{payment_id}",
                               description=f"{held.description}; applied by the operator")
        try:
            applied = (await book(state, entry,
                                  lambda: store.apply_unapplied_payment(SOURCE, payment_id, entry))).booked
        except Conflict:
            raise UnappliedError(409, f"Payment {payment_id} is in the ledger already.", "payment_id") from None
        held = await store.get_unapplied_payment(SOURCE, payment_id) or held
        if applied:
            log.info("DodoPayments payment %s: %s USD applied to %s by the operator", payment_id,
                     format_usd(held.amount_pico), account_id)
            return True, held
    if held.applied_to != account_id:
        raise UnappliedError(409, f"Payment {payment_id} was already applied to account {held.applied_to}.",
                             "payment_id")
    return False, held


class PaymentStats:
    """The open unapplied payments, as the ``/metrics`` scrape reads them (no query per scrape)."""

    REFRESH_SECONDS = 60.0

    def __init__(self) -> None:
        self.open_count = 0
        self.open_pico = 0

    async def refresh(self, store: Store) -> None:
        held = await store.list_unapplied_payments(limit=10_000)
        self.open_count, self.open_pico = len(held), sum(p.amount_pico for p in held)


PAYMENT_STATS: web.AppKey[PaymentStats] = web.AppKey("nexgate_plugins.payments.stats", PaymentStats)


# ---------------------------------------------------------------------- CLI


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


def register_cli(subparsers: Any) -> None:
    """``nexgate payments unapplied|apply``."""
    common, with_state = option_parents("whose cached balances to update")
    payments = subparsers.add_parser("payments", help="payments held unapplied: list, apply")
    sub = payments.add_subparsers(dest="payments_command", required=True, metavar="COMMAND")
    p = add_command(sub, "unapplied", "list payments credited to nobody (no, unknown or deleted account)",
                    _unapplied, common)
    p.add_argument("--all", action="store_true", help="the applied ones too")
    p = add_command(sub, "apply", "credit a held payment to an account (once)", _apply, with_state)
    p.add_argument("payment_id", metavar="PAYMENT_ID", help="the DodoPayments payment id (pay_...)")
    p.add_argument("account", metavar="ACCOUNT", help="a user or organization id")
