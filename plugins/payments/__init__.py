"""Payments: DodoPayments webhooks buy prepaid credits, refunds and lost disputes take them back.

``POST /webhooks/dodopayments`` (registered only when ``payments.dodopayments``
is configured) accepts Standard Webhooks deliveries:

* the signature is checked first, on the raw body: ``webhook-signature`` holds
  one or more space-separated ``v1,<base64>`` HMAC-SHA256 signatures of
  ``{webhook-id}.{webhook-timestamp}.{body}``; any configured secret
  (``whsec_<base64>``; several during a rotation) may match, compared in
  constant time. ``webhook-timestamp`` must be within ``tolerance_seconds`` of
  now, either way;
* ``payment.succeeded`` credits the account named in the payment's metadata
  (``account_metadata_key``) with the credit configured for each product of its
  cart, times the quantity: what the product buys, not the taxed total paid. The
  ledger description says what was paid in major units ("paid 10.99 USD").
  A payment that names no account, or an unknown or deleted one, is credited to
  nobody: it is *held unapplied* (200 "held"), logged as an error, counted in the
  ``nexgate_payments_unapplied`` metric, listed by ``nexgate payments unapplied``
  and ``GET /admin/v1/payments/unapplied``, and credited once to the account the
  operator chooses (``nexgate payments apply``, ``POST .../{payment_id}/apply``);
* ``refund.succeeded``, ``dispute.accepted`` and ``dispute.lost`` (the events
  that send money back to the payer; a dispute's two share its id, so it counts
  once) debit that account the refunded (disputed) share of what the payment
  credited. The share is cumulative per payment: each reversal takes the share of
  everything reversed so far, rounded up to the pico-dollar and at most what the
  payment credited, minus what the earlier reversals took (``reversed_total``). So
  partial refunds never drift, and refunds plus disputes never take back more than
  was credited (a reversal with nothing left to take is a 202).

Money moves exactly once: each entry carries (``dodopayments``,
``payment:<id>`` / ``refund:<id>`` / ``dispute:<id>``), which the ledger applies
at most once whatever delivery carries it, and the delivery is recorded under
its webhook id. A reversal moves its payment's reversed total in the same
transaction, compared-and-set: concurrent reversals of one payment never both
count the same remainder. After a new entry, the hot credit state is told (a
failure there is only logged: the ledger is the truth).

Answers: 200 processed ("applied", "held", or "duplicate"); 202 acknowledged but nothing to do
(an event type or product NexGate does not handle, a reversal of a payment it did not
credit or with nothing left to take back, with a warning in
the log: retrying would not change anything); 400 malformed (missing headers,
bad JSON, wrong field types); 401 bad signature or stale timestamp; 413 body
too large; 503 the store is unavailable (the sender retries). Never a 500,
which would make the sender retry an event that can never succeed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, AsyncIterator, Iterator

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily

from nexgate_proxy import GatewayError, hookimpl
from nexgate_plugins.credits import CREDITS
from nexgate_plugins.credits.grants import book
from nexgate_plugins.credits.holds import CreditState
from nexgate_proxy.appkeys import FEED, STORE
from nexgate_proxy.background import stop_tasks
from nexgate_proxy.config import Config, ConfigReader, ConfigSection
from nexgate_proxy.money import format_minor_units, format_usd, major_to_minor_units, usd_to_pico
from nexgate_proxy.requestbody import read_body
from nexgate_proxy.store import (
    MAX_PICO,
    Conflict,
    LedgerEntry,
    NewLedgerEntry,
    Store,
    StoreError,
    UnappliedPayment,
)

from .unapplied import PAYMENT_STATS, SOURCE, PaymentStats, register_cli, why_not_credited

log = logging.getLogger("nexgate.payments")

WEBHOOK_PATH = "/webhooks/dodopayments"
DEFAULT_MAX_BODY_BYTES = 256 * 1024
MAX_SIGNATURE_HEADER = 8 * 1024
MAX_ID_LENGTH = 255
MAX_QUANTITY = 1_000_000

_HEADER_ID = re.compile(r"[\x21-\x7e]{1,255}")
_ACCOUNT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PAID = re.compile(r"; paid (\d{1,18}(?:\.\d{1,3})?) ([A-Z]{3})(?:;|$)")


# ------------------------------------------------------------------ settings


@dataclass(frozen=True, slots=True)
class DodoSettings:
    secrets: tuple[bytes, ...] = field(repr=False)
    """Decoded HMAC keys; any one may sign (rotation)."""
    products: Mapping[str, int]
    """Product id -> pico-USD credited per unit bought."""
    tolerance_seconds: int = 300
    account_metadata_key: str = "nexgate_account_id"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


@dataclass(frozen=True, slots=True)
class PaymentSettings:
    dodopayments: DodoSettings | None = None


def decode_secret(secret: str) -> bytes:
    """``whsec_<base64>`` (the prefix is optional) -> the HMAC key. ValueError when it is not one."""
    text = secret.strip()
    if text.startswith("whsec_"):
        text = text[len("whsec_"):]
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not a webhook secret: expected whsec_ followed by base64 (copy it from the "
                         "DodoPayments dashboard)") from None
    if len(key) < 16:
        raise ValueError("is too short to be a webhook secret (fewer than 16 bytes)")
    return key


def parse_payment_settings(r: ConfigReader, section: dict[str, Any], config: Config) -> PaymentSettings:
    if section.get("dodopayments") is None:
        return PaymentSettings()
    p = "payments.dodopayments"
    s = r.mapping(section["dodopayments"], p, ("webhook_secrets", "tolerance_seconds", "account_metadata_key",
                                               "products", "max_body_bytes"))
    secrets: list[bytes] = []
    raw_secrets = s.get("webhook_secrets")
    if not isinstance(raw_secrets, list) or not raw_secrets:
        r.problem(f"{p}.webhook_secrets", 'required: a list of webhook signing secrets, e.g. '
                  '["${DODO_WEBHOOK_SECRET}"] (two during a rotation)')
    else:
        for i, raw in enumerate(raw_secrets):
            here = f"{p}.webhook_secrets[{i}]"
            if not isinstance(raw, str) or not raw.strip():
                r.problem(here, "empty: set the secret (is its environment variable set?)")
                continue
            try:
                secrets.append(decode_secret(raw))
            except ValueError as exc:
                r.problem(here, str(exc))  # never the value: it is a secret
    key = r.value(s, "account_metadata_key", p, str, "nexgate_account_id",
                  lambda v: None if 0 < len(v) <= 100 else "must be a non-empty metadata key")
    products: dict[str, int] = {}
    raw_products = r.mapping(s.get("products"), f"{p}.products")
    if not raw_products:
        r.problem(f"{p}.products", 'required: the products that buy credits, e.g. {prod_xxx: {credit_usd: "10"}}')
    for product_id, spec in raw_products.items():
        here = f"{p}.products.{product_id}"
        ps = r.mapping(spec, here, ("credit_usd",))
        if "credit_usd" not in ps:
            r.problem(f"{here}.credit_usd", 'required: the USD of credits one unit buys, e.g. "10"')
            continue
        usd = r.value(ps, "credit_usd", here, Decimal, None,
                      lambda v: None if v > 0 else "must be greater than 0")
        if usd is None:
            continue
        try:
            pico = usd_to_pico(usd)
        except ValueError:
            r.problem(f"{here}.credit_usd", "has more than 12 decimals (finer than a pico-dollar)")
            continue
        if pico > MAX_PICO:
            r.problem(f"{here}.credit_usd", "is larger than a balance can hold")
            continue
        products[str(product_id)] = pico
    settings = DodoSettings(
        secrets=tuple(secrets),
        products=products,
        tolerance_seconds=r.value(s, "tolerance_seconds", p, int, 300,
                                  lambda v: None if 1 <= v <= 3600 else "must be between 1 and 3600"),
        account_metadata_key=key,
        max_body_bytes=r.value(s, "max_body_bytes", p, int, DEFAULT_MAX_BODY_BYTES,
                               lambda v: None if 1024 <= v <= 16 * 1024 * 1024
                               else "must be between 1024 and 16777216"),
    )
    return PaymentSettings(dodopayments=settings)


PAYMENTS_SECTION = ConfigSection("payments", parse_payment_settings, ("dodopayments",),
                                 "Payment providers whose webhooks buy credits (DodoPayments).")


PAYMENTS: web.AppKey[PaymentSettings] = web.AppKey("nexgate_plugins.payments", PaymentSettings)


# ------------------------------------------------------------ verification


class Rejected(Exception):
    """A delivery answered with a 4xx; the message is safe to return."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def response(self) -> web.Response:
        return GatewayError(self.status, self.message, code=self.code, param=self.param).response()


def sign(secret: bytes, webhook_id: str, timestamp: str, body: bytes) -> str:
    """The ``v1`` signature (base64) of a delivery: senders and tests use it too."""
    digest = hmac.new(secret, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify(settings: DodoSettings, headers: Mapping[str, str], body: bytes, now: float | None = None) -> str:
    """Check a delivery's Standard Webhooks headers and signature; return its webhook id. Raises Rejected."""
    webhook_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    for name, value in (("webhook-id", webhook_id), ("webhook-timestamp", timestamp),
                        ("webhook-signature", signatures)):
        if not value:
            raise Rejected(400, "missing_header", f"The {name} header is required.", name)
    assert webhook_id is not None and timestamp is not None and signatures is not None
    if _HEADER_ID.fullmatch(webhook_id) is None:
        raise Rejected(400, "invalid_header", "The webhook-id header is malformed.", "webhook-id")
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        raise Rejected(400, "invalid_header", "The webhook-timestamp header must be Unix seconds.",
                       "webhook-timestamp")
    if len(signatures) > MAX_SIGNATURE_HEADER:
        raise Rejected(400, "invalid_header", "The webhook-signature header is too long.", "webhook-signature")
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > settings.tolerance_seconds:
        raise Rejected(401, "invalid_signature", "The webhook timestamp is outside the allowed tolerance.",
                       "webhook-timestamp")
    offered = []
    for item in signatures.split():
        version, _, value = item.partition(",")
        if version == "v1" and value:
            offered.append(value.encode("ascii", "replace"))
    matched = False
    for secret in settings.secrets:
        expected = sign(secret, webhook_id, timestamp, body).encode("ascii")
        for candidate in offered:
            # Every comparison runs (no early exit): the time says nothing about which one matched.
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise Rejected(401, "invalid_signature", "No valid signature.", "webhook-signature")
    return webhook_id


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_event(body: bytes) -> tuple[str, dict[str, Any]]:
    """(type, data) of a verified body. Raises Rejected (400) when it is not an event."""
    try:
        event = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Rejected(400, "invalid_json", "The body is not valid JSON.") from None
    if not isinstance(event, dict):
        raise Rejected(400, "invalid_event", "The body must be a JSON object.")
    event_type = event.get("type")
    if not isinstance(event_type, str) or not event_type or len(event_type) > 100:
        raise Rejected(400, "invalid_event", "The event has no 'type'.", "type")
    data = event.get("data")
    if not isinstance(data, dict):
        data = {}
    return event_type, data


# ------------------------------------------------------------------- events


class Ignored(Exception):
    """A verified event NexGate does nothing with: acknowledged with 202 and a warning."""


def _text(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or _HEADER_ID.fullmatch(value) is None:
        raise Rejected(400, "invalid_event", f"'data.{name}' must be an id string.", f"data.{name}")
    return value


def _minor_units(value: Any, name: str, currency: Any = None) -> int:
    """A non-negative amount in the currency's smallest unit.

    An integer, or a string: digits are smallest units (DodoPayments sends a
    dispute's amount as a string), a decimal like "11.80" is major units.
    """
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.isascii() and 0 < len(value) <= 24:
        text = value.strip()
        if text.isdigit():
            value = int(text)
        elif re.fullmatch(r"\d+\.\d+", text):
            value = major_to_minor_units(text, currency if isinstance(currency, str) else "")
    if not isinstance(value, int) or value < 0 or value > 10**18:
        raise Rejected(400, "invalid_event", f"'data.{name}' must be a non-negative integer amount.",
                       f"data.{name}")
    return value


def _metadata(data: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = data.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise Rejected(400, "invalid_event", "'data.metadata' must be an object.", "data.metadata")
    return metadata


def _metadata_account(settings: DodoSettings, data: Mapping[str, Any]) -> str | None:
    value = _metadata(data).get(settings.account_metadata_key)
    if isinstance(value, str) and _ACCOUNT_ID.fullmatch(value.strip()):
        return value.strip()
    return None


@dataclass(frozen=True, slots=True)
class _Payment:
    """What a ``payment.succeeded`` buys, and whom it names."""

    payment_id: str
    credit_pico: int
    description: str
    account_hint: str | None


def _read_payment(settings: DodoSettings, data: Mapping[str, Any]) -> _Payment:
    payment_id = _text(data, "payment_id")
    _metadata(data)  # validated here: a malformed one is a 400 whatever the cart holds
    cart = data.get("product_cart")
    if cart is None:
        raise Ignored(f"payment {payment_id} has no product cart")
    if not isinstance(cart, list):
        raise Rejected(400, "invalid_event", "'data.product_cart' must be a list.", "data.product_cart")
    credit = 0
    bought: list[str] = []
    unknown: list[str] = []
    for item in cart:
        if not isinstance(item, dict):
            raise Rejected(400, "invalid_event", "'data.product_cart' items must be objects.", "data.product_cart")
        product_id = _text(item, "product_id")
        quantity = item.get("quantity", 1)
        if isinstance(quantity, bool) or not isinstance(quantity, int) or not 1 <= quantity <= MAX_QUANTITY:
            raise Rejected(400, "invalid_event", "'quantity' must be a positive integer.", "data.product_cart")
        per_unit = settings.products.get(product_id)
        if per_unit is None:
            unknown.append(product_id)
            continue
        credit += per_unit * quantity
        bought.append(f"{quantity} x {product_id}")
    if unknown:
        log.warning("DodoPayments payment %s: product(s) %s buy no credits (not in payments.dodopayments.products)",
                    payment_id, ", ".join(unknown))
    if credit == 0:
        raise Ignored(f"payment {payment_id} buys no configured product")
    if credit > MAX_PICO:
        log.error("DodoPayments payment %s: %s USD of credits is more than a balance can hold; grant it by hand",
                  payment_id, format_usd(credit))
        raise Ignored(f"payment {payment_id}: amount out of range")
    description = f"DodoPayments payment {payment_id}: {', '.join(bought)}"
    total = data.get("total_amount")
    currency = data.get("currency")
    if isinstance(total, int) and not isinstance(total, bool) and 0 <= total < 10**18 and \
            isinstance(currency, str) and re.fullmatch(r"[A-Za-z]{3}", currency):
        # Major units, as a person reads them ("paid 10.99 USD"); reversals read it back (paid_minor_units).
        description = f"{description[:400]}; paid {format_minor_units(total, currency)}"
    return _Payment(payment_id, credit, description, _metadata_account(settings, data))


def paid_minor_units(description: str | None) -> tuple[int, str] | None:
    """(amount in minor units, currency) a payment's ledger description records, or None.

    "paid 10.99 USD" is major units; digits alone ("paid 1099 USD", written before amounts were shown
    in major units, or a currency without decimals such as JPY) are minor units.
    """
    match = _PAID.search(description or "")
    if match is None:
        return None
    amount, currency = match.groups()
    minor = int(amount) if "." not in amount else major_to_minor_units(amount, currency)
    return None if minor is None else (minor, currency)


async def credit_payment(app: web.Application, settings: DodoSettings, store: Store,
                         data: Mapping[str, Any]) -> str:
    """Credit a payment to the account it names; hold it unapplied when that is none, unknown or deleted.

    "applied", "held" or "duplicate" (seen before: credited, or held, already)."""
    paid = _read_payment(settings, data)
    external_id = f"payment:{paid.payment_id}"
    held = await store.get_unapplied_payment(SOURCE, paid.payment_id)
    if held is not None or await store.get_ledger_entry(SOURCE, external_id) is not None:
        return "duplicate"
    why = await why_not_credited(store, paid.account_hint, settings.account_metadata_key)
    if why is not None:
        new = await store.hold_payment(UnappliedPayment(
            source=SOURCE, payment_id=paid.payment_id, account_hint=paid.account_hint,
            amount_pico=paid.credit_pico, description=paid.description, reason=why, received_at=datetime.now(UTC)))
        if new:
            log.error("DodoPayments payment %s: %s; %s USD of credits held unapplied (apply it with `nexgate "
                      "payments apply %s ACCOUNT`)", paid.payment_id, why, format_usd(paid.credit_pico),
                      paid.payment_id)
            await app[PAYMENT_STATS].refresh(store)
        return "held" if new else "duplicate"
    entry = NewLedgerEntry(account_id=paid.account_hint or "", kind="payment", amount_pico=paid.credit_pico,
                           source=SOURCE, external_id=external_id, description=paid.description)
    credited = await book(_credit_state(app), entry, lambda: store.apply_ledger_entry(entry))
    return "applied" if credited.booked else "duplicate"


async def find_payment(store: Store, payment_id: str) -> LedgerEntry | None:
    """The ledger entry that credited this payment, or None when it is unknown here (one indexed query)."""
    return await store.get_ledger_entry(SOURCE, f"payment:{payment_id}")


def reversed_total(credited: int, reversed_minor: int, paid: int) -> int:
    """What a payment's reversals take back in all once ``reversed_minor`` of the ``paid`` minor units
    went back: ``credited * reversed_minor / paid`` rounded up to the pico-dollar, at most ``credited``.

    Each reversal debits this total minus what the earlier ones debited, so the debits add up to
    exactly the cumulative share, never drift with the number of partial refunds, and never take
    back more than the payment credited, whatever mix of refunds and disputes arrives."""
    if paid <= 0 or reversed_minor >= paid:
        return credited
    return min(credited, -(-credited * reversed_minor // paid))


REVERSALS: Mapping[str, tuple[str, str]] = {
    "refund.succeeded": ("refund", "refund_id"),
    "dispute.lost": ("dispute", "dispute_id"),
    "dispute.accepted": ("dispute", "dispute_id"),  # the merchant accepted it: the funds go back
}
"""Events that move money back to the payer: (ledger kind, the field of their id). A dispute's
"accepted" and "lost" share its id: it is taken back once, whichever arrives."""
MAX_REVERSAL_ATTEMPTS = 10


async def reverse_payment(app: web.Application, store: Store, data: Mapping[str, Any], kind: str,
                          id_field: str) -> str:
    """Debit a refund's or dispute's share of what its payment credited: "applied" or "duplicate"."""
    reversal_id = _text(data, id_field)
    payment_id = _text(data, "payment_id")
    amount = _minor_units(data.get("amount"), "amount", data.get("currency"))
    external_id = f"{kind}:{reversal_id}"
    if await store.get_ledger_entry(SOURCE, external_id) is not None:
        return "duplicate"
    payment = await find_payment(store, payment_id)
    if payment is None or payment.amount_pico <= 0:
        held = await store.get_unapplied_payment(SOURCE, payment_id)
        if held is not None:
            log.error("DodoPayments %s %s: payment %s is held unapplied: nothing debited; do not apply it unless "
                      "what was taken back is settled", kind, reversal_id, payment_id)
        else:
            log.warning("DodoPayments %s %s: payment %s credited nothing here; nothing debited", kind, reversal_id,
                        payment_id)
        raise Ignored(f"{kind} {reversal_id}: unknown payment {payment_id}")
    paid = paid_minor_units(payment.description)
    if paid is None:
        log.warning("DodoPayments %s %s: the amount paid for %s is unknown; nothing debited (debit by hand)",
                    kind, reversal_id, payment_id)
        raise Ignored(f"{kind} {reversal_id}: amount paid unknown")
    paid_amount, currency = paid
    sent_currency = data.get("currency")
    if isinstance(sent_currency, str) and sent_currency.upper() != currency:
        log.warning("DodoPayments %s %s is in %s, payment %s was in %s; taking the share as if the same",
                    kind, reversal_id, sent_currency[:8], payment_id, currency)
    noun = "refund" if kind == "refund" else "dispute"
    for _ in range(MAX_REVERSAL_ATTEMPTS):
        before = await store.get_payment_reversed(SOURCE, payment_id)
        after_minor = before[0] + amount
        total = reversed_total(payment.amount_pico, after_minor, paid_amount)
        debit = total - before[1]
        if debit <= 0:
            log.warning("DodoPayments %s %s: nothing left to take back of payment %s (%s USD credited, %s USD "
                        "taken back already)", kind, reversal_id, payment_id, format_usd(payment.amount_pico),
                        format_usd(before[1]))
            raise Ignored(f"{kind} {reversal_id}: nothing left to take back of payment {payment_id}")
        entry = NewLedgerEntry(
            account_id=payment.account_id, kind=kind, amount_pico=-debit, source=SOURCE, external_id=external_id,
            description=f"DodoPayments {noun} {reversal_id} of payment {payment_id}: "
                        f"{format_minor_units(amount, currency)} of {format_minor_units(paid_amount, currency)}")
        totals = (after_minor, total)
        try:
            credited = await book(_credit_state(app), entry,
                                  lambda: store.apply_reversal(entry, payment_id, before, totals))
        except Conflict:
            continue  # a concurrent reversal of the same payment came first: compute from its total
        return "applied" if credited.booked else "duplicate"
    raise StoreError(f"payment {payment_id}: too many concurrent reversals")  # 503: the sender retries


def _credit_state(app: web.Application) -> CreditState | None:
    """With credits on, a credit is booked through their hot state (see credits.grants.book)."""
    credits = app.get(CREDITS)
    return credits.state if credits is not None else None


async def handle_event(app: web.Application, settings: DodoSettings, store: Store, event_type: str,
                       data: Mapping[str, Any]) -> str:
    if event_type == "payment.succeeded":
        return await credit_payment(app, settings, store, data)
    if event_type in REVERSALS:
        kind, id_field = REVERSALS[event_type]
        return await reverse_payment(app, store, data, kind, id_field)
    raise Ignored(f"event type {event_type[:100]!r} is not handled")


# ------------------------------------------------------------------ handler


async def process(app: web.Application, settings: DodoSettings, headers: Mapping[str, str],
                  body: bytes) -> tuple[int, dict[str, Any]]:
    """Verify and apply one delivery: (status, JSON answer). Raises Rejected and StoreError."""
    webhook_id = verify(settings, headers, body)
    event_type, data = parse_event(body)
    store = app[STORE]
    try:
        # The ledger applies each (source, external_id) once, whichever delivery carries it:
        # so a crash before the delivery is recorded loses nothing, and the cached balance moves
        # only by the one call that really applied the entry.
        status = await handle_event(app, settings, store, event_type, data)
    except Ignored as why:
        # Not recorded as processed: once the config names the product or the
        # payment, a resend of the same delivery is applied.
        log.warning("DodoPayments webhook %s (%s) acknowledged, nothing done: %s", webhook_id, event_type,
                    str(why))
        return 202, {"received": True, "status": "ignored", "webhook_id": webhook_id}
    await store.apply_webhook(SOURCE, webhook_id, event_type, [])
    if status == "applied":
        log.info("DodoPayments webhook %s (%s) applied", webhook_id, event_type)
        await app[FEED].deliver_now()  # this instance's cached balance at once; the others within a second
    return 200, {"received": True, "status": status, "webhook_id": webhook_id}


async def dodopayments_webhook(request: web.Request) -> web.Response:
    settings = request.app[PAYMENTS].dodopayments
    assert settings is not None
    try:
        body = await read_body(request, settings.max_body_bytes, too_large_code="body_too_large")
        status, answer = await process(request.app, settings, request.headers, body)
        return web.json_response(answer, status=status)
    except GatewayError as exc:  # the body itself: too large, a bad encoding, the sender gone
        return exc.response()
    except Rejected as exc:
        if exc.status == 401:
            log.warning("DodoPayments webhook refused: %s", exc.message)
        return exc.response()
    except StoreError as exc:
        log.error("DodoPayments webhook: the store failed (%s); the sender will retry", type(exc).__name__)
        return GatewayError(503, "The account database is unavailable; retry later.",
                            code="store_unavailable").response()
    except Exception:
        # Retried by the sender: once fixed, the payment is still credited.
        log.exception("DodoPayments webhook: unexpected error")
        return GatewayError(503, "The webhook could not be processed; retry later.",
                            code="webhook_failed").response()


async def _method_not_allowed(request: web.Request) -> web.Response:
    return GatewayError(405, f"{request.method} is not supported on {request.path}; use POST.",
                        code="method_not_allowed", headers={"Allow": "POST"}).response()


# -------------------------------------------------------------------- hooks


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [PAYMENTS_SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    settings = config.section(PAYMENTS_SECTION)
    app[PAYMENTS] = settings
    app[PAYMENT_STATS] = PaymentStats()
    if settings.dodopayments is not None:
        resource = app.router.add_resource(WEBHOOK_PATH)
        resource.add_route("POST", dodopayments_webhook)
        resource.add_route("*", _method_not_allowed)


async def _refresh_stats(app: web.Application) -> None:
    """Other instances (and the operator's CLI) hold and apply payments too: read the count again now and then."""
    while True:
        try:
            await app[PAYMENT_STATS].refresh(app[STORE])
        except StoreError:
            pass  # the next round tries again
        await asyncio.sleep(PaymentStats.REFRESH_SECONDS)


@hookimpl
async def nexgate_lifespan(app: web.Application, config: Config) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(_refresh_stats(app), name="nexgate-payments-stats")
    yield
    await stop_tasks(task)


@hookimpl
def nexgate_metrics(app: web.Application) -> Iterator[Any]:
    stats = app[PAYMENT_STATS]
    yield GaugeMetricFamily("nexgate_payments_unapplied", "Payments held unapplied (they named no account, or "
                            "an unknown or deleted one): apply them with `nexgate payments apply`.",
                            value=stats.open_count)
    yield GaugeMetricFamily("nexgate_payments_unapplied_credit_usd", "The credit the unapplied payments buy, USD.",
                            value=stats.open_pico / 10**12)


@hookimpl
def nexgate_cli_commands(subparsers: Any) -> None:
    register_cli(subparsers)
