"""Booking credits from outside a request: grants and adjustments (CLI and admin API), payments.

``book`` applies a ledger entry through the hot credit state when there is one, so every
running gateway's cached balance moves by it exactly once (see ``holds.base``). ``grant`` is
the one implementation of ``nexgate credits grant|adjust`` and ``POST /admin/v1/credits``:
plain decimal amounts, a one-line reason, and an idempotency ref that is applied once and
never to a second account.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from decimal import Decimal

from nexgate_proxy.money import format_usd, usd_to_pico
from nexgate_proxy.store import MAX_PICO, MIN_PICO, LedgerEntry, NewLedgerEntry, Store

from .holds import Booker, Credited, CreditState

log = logging.getLogger("nexgate.credits")

GRANT_SOURCE = "admin"
MAX_REASON_LENGTH = 500
MAX_REF_LENGTH = 200
_PLAIN_DECIMAL = re.compile(r"(-?)\$?([0-9]{1,30})(?:\.([0-9]{1,30}))?")


class GrantError(ValueError):
    """A grant the operator must correct; the message says how (and names the field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


async def book(state: CreditState | None, entry: NewLedgerEntry, apply: Booker) -> Credited:
    """Run ``apply`` (which commits ``entry``) through the hot state, if any: True in ``booked`` when it
    was new. A hot state that did not hear of it is only logged: the ledger is the truth."""
    if state is None:
        return Credited(await apply(), reached_state=True)
    credited = await state.credit(entry.account_id, entry.amount_pico, apply)
    if credited.booked and not credited.reached_state:
        log.warning("could not update the cached balance of %s after %s", entry.account_id, entry.external_id)
    return credited


def parse_usd(text: str, *, signed: bool = False) -> int:
    """A plain decimal amount of USD ("10", "2.50", "$5"; "-3" when ``signed``) -> pico-USD.

    No exponents, separators or signs beyond a leading minus: ``1e3`` is an error, not 1000.
    """
    match = _PLAIN_DECIMAL.fullmatch(text.strip())
    if match is None or (match.group(1) and not signed):
        example = "10, 2.50 or -3" if signed else "10 or 2.50"
        raise GrantError("amount", f"{text!r} is not a plain decimal amount of USD, e.g. {example}")
    usd = Decimal(f"{match.group(1)}{match.group(2)}.{match.group(3) or '0'}")
    if usd == 0:
        raise GrantError("amount", "the amount must not be 0" if signed else "the amount must be greater than 0")
    try:
        pico = usd_to_pico(usd)
    except ValueError:
        raise GrantError("amount", f"{text.strip()} USD is finer than a pico-dollar (at most 12 decimals)") from None
    if abs(pico) > MAX_PICO:
        raise GrantError("amount", f"{text.strip()} USD is more than a balance can hold")
    return pico


def check_reason(text: str) -> str:
    reason = text.strip()
    if not reason:
        raise GrantError("reason", "the reason must not be empty")
    if len(reason) > MAX_REASON_LENGTH or any(ord(c) < 0x20 for c in reason):
        raise GrantError("reason", f"the reason must be one line of at most {MAX_REASON_LENGTH} characters")
    return reason


def check_ref(text: str | None) -> str | None:
    if text is None:
        return None
    ref = text.strip()
    if not 0 < len(ref) <= MAX_REF_LENGTH or any(ord(c) < 0x20 for c in ref):
        raise GrantError("ref", f"the ref must be 1 to {MAX_REF_LENGTH} characters on one line")
    return ref


@dataclass(frozen=True, slots=True)
class Granted:
    applied: bool
    """False: the ref was applied before (to this account, this amount): nothing changed."""
    entry: LedgerEntry | NewLedgerEntry
    balance_pico: int
    reached_state: bool = True
    """False: the hot state did not answer; running gateways see the change when they next load the balance."""


async def grant(store: Store, state: CreditState | None, account_id: str, amount_pico: int, reason: str,
                ref: str | None, *, kind: str = "grant") -> Granted:
    """Book a grant (positive) or an adjustment (either sign) to an existing account, once per ref.

    GrantError when the ref was used before for another account, kind or amount.
    """
    external_id = f"grant:{ref}" if ref is not None else f"grant:{uuid.uuid4().hex}"
    entry = NewLedgerEntry(account_id=account_id, kind=kind, amount_pico=amount_pico, source=GRANT_SOURCE,
                           external_id=external_id, description=reason)
    before = await store.get_ledger_entry(GRANT_SOURCE, external_id) if ref is not None else None
    applied, reached = False, True
    if before is None:
        if not MIN_PICO <= await store.get_balance(account_id) + amount_pico <= MAX_PICO:
            raise GrantError("amount", f"${format_usd(amount_pico)} would take the balance of {account_id} "
                                       "beyond what a balance can hold")
        credited = await book(state, entry, lambda: store.apply_ledger_entry(entry))
        applied, reached = credited.booked, credited.reached_state
        if not applied:  # another call with this ref won the race
            before = await store.get_ledger_entry(GRANT_SOURCE, external_id)
    if before is not None:
        _same_grant(ref, before, entry)
    return Granted(applied, before or entry, await store.get_balance(account_id), reached)


def _same_grant(ref: str | None, before: LedgerEntry, wanted: NewLedgerEntry) -> None:
    """A ref names one grant: reusing it for anything else is a mistake to report, not to swallow."""
    if before.account_id != wanted.account_id:
        raise GrantError("ref", f"the ref {ref!r} was already used for account {before.account_id} "
                                f"({before.kind} of ${format_usd(before.amount_pico)}): choose another ref")
    if (before.kind, before.amount_pico) != (wanted.kind, wanted.amount_pico):
        raise GrantError("ref", f"the ref {ref!r} was already used for a {before.kind} of "
                                f"${format_usd(before.amount_pico)} to {before.account_id}: choose another ref")
