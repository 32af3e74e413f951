"""Account deletion and data export: the admin API's privacy endpoints, shared with the CLI.

* ``DELETE /admin/v1/users/{user_id}`` (``nexgate users delete ID --yes``):
  the user themself (Clerk session) or the superadmin. In one transaction
  (``Store.anonymize_user``): the user's personal keys and the organization
  keys they created are revoked (recorded on the store's change feed, so every
  running gateway refuses them within a second); their memberships end; email, name and external_id
  become NULL and ``deleted_at`` is set, the row staying as an anonymous id;
  the client IPs of their usage records are cleared. Usage records, ledger
  entries and the balance stay under that anonymous id. Refused with 409
  ``last_owner`` (nothing changed) while they are the last owner of an
  organization. **Idempotent**: deleting an already deleted account answers
  200 again with ``already_deleted: true`` and changes nothing. (A Clerk user
  who signs in again after deleting their account gets a new, empty account:
  nothing links them to the old id any more, so their old id answers 404 to
  them.)
* ``GET /admin/v1/users/{user_id}/export?format=json|csv``
  (``nexgate users export ID --format json|csv --output FILE``): the user's
  profile, balance, personal keys (metadata only), memberships, every usage
  record of their personal account and every ledger entry, oldest first; for the days whose
  request rows were rolled up (``usage.rollup_after_days``), ``usage_daily``: their daily
  totals per model, each marked ``"object": "usage.daily_rollup"``.
  ``json``: one document (:func:`build_export`). ``csv``: a zip with one CSV
  per section (``user.csv``, ``balance.csv``, ``api_keys.csv``,
  ``memberships.csv``, ``usage.csv``, ``usage_daily.csv``, ``ledger.csv``), UTF-8, a header row
  each, the JSON's columns in the same order; empty cell = null, booleans
  ``true``/``false``, lists and objects as JSON, amounts in integer pico-USD;
  free-text cells starting with ``= + - @`` get a leading ``'`` so spreadsheets
  do not run them as formulas.

* ``PATCH /admin/v1/users/{user_id}`` (``nexgate users update ID --email E --name N``): correction.
  The user themself or the superadmin sets ``email`` and/or ``name`` (null clears one); the old
  values are overwritten in the store (on SQLite, zeroed and checkpointed out of the WAL). A Clerk
  user's email is also refreshed from the session token's ``email`` claim at sign-in.
* ``POST /admin/v1/users/{user_id}/suspend`` and ``/unsuspend`` (``nexgate users suspend|unsuspend
  ID``): restriction of processing, superadmin only (a user asks for it through the operator, as
  the privacy policy says). While suspended the user's personal keys are refused 403
  ``account_suspended`` on every gateway within a second (an ``api_key`` change per key on the
  store's feed), the user cannot create keys, and nothing is deleted: lifting it restores
  everything. The user may still read, export and delete their data. ``suspended_at`` is part of
  the user's profile and of the export.

Anyone else's account answers 404 (as in the rest of the admin API, ids are not
probed): organization owners and admins included, who see their
organization's keys and members but never a member's personal data.

``OPENAPI_PATHS`` and ``OPENAPI_SCHEMAS`` describe these endpoints for the
admin API's OpenAPI document.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import zipfile
from dataclasses import fields
from datetime import UTC, date, datetime
from typing import Any, Awaitable, Callable

from aiohttp import web

from nexgate_proxy.appkeys import FEED, STORE
from nexgate_proxy.money import format_usd
from nexgate_proxy.store import (
    AnonymizedUser, ChangeFeed, LedgerEntry, NotFound, Store, UsageRecord, User,
)
from .privacy_openapi import EXPORT_VERSION
from .api import MAX_EMAIL_LENGTH, MAX_NAME_LENGTH, Caller, iso, key_json, user_json
from .http import bad, check_query, clean_text, forbidden, is_id, not_found, read_body

log = logging.getLogger("nexgate.privacy")

PAGE_SIZE = 1000

# ------------------------------------------------------------------ deletion


async def delete_account(store: Store, feed: ChangeFeed | None, user_id: str) -> AnonymizedUser:
    """Anonymize the account in one transaction (the store tells every gateway its keys are revoked).

    This process's ``feed`` delivers that at once. Raises NotFound for an unknown user and
    LastOwnerError (nothing changed) for the last owner of an org.
    """
    result = await store.anonymize_user(user_id)
    if feed is not None:
        await feed.deliver_now()
    if not result.already_deleted:
        log.info("account %s deleted: %d keys revoked, %d organizations left, %d usage records' IPs cleared",
                 user_id, len(result.revoked_key_ids), len(result.left_org_ids), result.cleared_ips)
    return result


def deletion_json(result: AnonymizedUser) -> dict[str, Any]:
    return {
        "object": "user.deleted", "id": result.user.id, "deleted": True,
        "deleted_at": iso(result.user.deleted_at), "already_deleted": result.already_deleted,
        "revoked_key_ids": list(result.revoked_key_ids), "left_org_ids": list(result.left_org_ids),
        "cleared_ip_records": result.cleared_ips,
    }


# ---------------------------------------------------- correction, restriction


def profile_value(field: str, value: str | None) -> str | None:
    """A corrected email or name: trimmed, not blank, no control characters; None clears it.

    Raises ValueError saying what is wrong (the API answers 400 naming the field, the CLI exits 1).
    """
    if value is None:
        return None
    limit = MAX_EMAIL_LENGTH if field == "email" else MAX_NAME_LENGTH
    value = value.strip()
    if not value:
        raise ValueError(f"'{field}' must not be empty (null clears it)")
    if len(value) > limit:
        raise ValueError(f"'{field}' is longer than {limit} characters")
    if not clean_text(value):
        raise ValueError(f"'{field}' contains control characters or invalid Unicode")
    if field == "email" and "@" not in value:
        raise ValueError("'email' is not an email address")
    return value


async def correct_user(store: Store, user: User, changes: dict[str, str | None]) -> User:
    """Write the corrected fields (``email``, ``name``), keeping the others as they are."""
    email = changes["email"] if "email" in changes else user.email
    name = changes["name"] if "name" in changes else user.name
    updated = await store.update_user(user.id, email=email, name=name)
    log.info("user %s corrected: %s", user.id, ", ".join(sorted(changes)))
    return updated


async def suspend_account(store: Store, feed: ChangeFeed | None, user_id: str, suspended: bool) -> tuple[User, bool]:
    """Suspend or lift the suspension; the store's feed tells every gateway (this one at once)."""
    user, changed = await store.set_user_suspended(user_id, suspended)
    if feed is not None and changed:
        await feed.deliver_now()
    if changed:
        log.info("account %s %s", user_id, "suspended" if suspended else "no longer suspended")
    return user, changed


# -------------------------------------------------------------------- export

USER_COLUMNS = ("id", "external_id", "email", "name", "created_at", "deleted_at", "suspended_at")
BALANCE_COLUMNS = ("account_id", "balance_pico", "balance_usd")
KEY_COLUMNS = ("id", "name", "prefix", "user_id", "org_id", "created_by", "created_at", "last_used_at",
               "expires_at", "revoked_at", "allowed_models", "limits")
MEMBERSHIP_COLUMNS = ("org_id", "org_name", "role", "created_at")
USAGE_COLUMNS = UsageRecord._fields
LEDGER_COLUMNS = tuple(f.name for f in fields(LedgerEntry))
USAGE_DAILY_COLUMNS = ("object", "day", "model", "requests", "prompt_tokens", "completion_tokens", "cost_pico")
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("user", USER_COLUMNS), ("balance", BALANCE_COLUMNS), ("api_keys", KEY_COLUMNS),
    ("memberships", MEMBERSHIP_COLUMNS), ("usage", USAGE_COLUMNS), ("usage_daily", USAGE_DAILY_COLUMNS),
    ("ledger", LEDGER_COLUMNS),
)
"""(section, columns): the JSON document's sections and each CSV file's header, in order."""
TEXT_COLUMNS = frozenset({"external_id", "email", "name", "org_name", "description"})
"""Free text someone typed: escaped in CSV when a spreadsheet would read it as a formula."""


def usage_json(row: UsageRecord) -> dict[str, Any]:
    data = {name: getattr(row, name) for name in USAGE_COLUMNS}
    data["ts"] = iso(row.ts)
    return data


def ledger_json(entry: LedgerEntry) -> dict[str, Any]:
    data = {name: getattr(entry, name) for name in LEDGER_COLUMNS}
    data["created_at"] = iso(entry.created_at)
    return data


async def _all_usage(store: Store, account_id: str, until: datetime) -> list[UsageRecord]:
    rows: dict[str, UsageRecord] = {}
    offset = 0
    while True:
        page = await store.list_usage(account_id=account_id, until=until, limit=PAGE_SIZE, offset=offset)
        for row in page:
            rows.setdefault(row.request_id, row)  # a row inserted meanwhile shifts pages: never twice
        if len(page) < PAGE_SIZE:
            break
        offset += PAGE_SIZE
    return sorted(rows.values(), key=lambda r: (r.ts, r.request_id))


async def _rolled_up_days(store: Store, account_id: str, usage: list[UsageRecord], until: datetime
                          ) -> list[dict[str, Any]]:
    """Daily totals (per UTC day and model) of the days whose request rows usage.rollup_after_days
    deleted, wholly or partly: those the rows no longer add up to. Marked ``usage.daily_rollup``."""
    counted: dict[tuple[str, str], int] = {}
    for row in usage:
        cell = (row.ts.astimezone(UTC).date().isoformat(), row.model or "")
        counted[cell] = counted.get(cell, 0) + 1
    days = await store.usage_by_day_and_model(account_id=account_id, since=date(1970, 1, 1), until=until.date())
    return [{"object": "usage.daily_rollup", "day": day, "model": total.group or None, "requests": total.requests,
             "prompt_tokens": total.prompt_tokens, "completion_tokens": total.completion_tokens,
             "cost_pico": total.cost_pico}
            for day, total in days if counted.get((day, total.group), 0) < total.requests]


async def _all_ledger(store: Store, account_id: str, until: datetime) -> list[LedgerEntry]:
    entries: dict[int, LedgerEntry] = {}
    offset = 0
    while True:
        page = await store.list_ledger(account_id, until=until, limit=PAGE_SIZE, offset=offset)
        for entry in page:
            entries.setdefault(entry.id, entry)
        if len(page) < PAGE_SIZE:
            break
        offset += PAGE_SIZE
    return [entries[i] for i in sorted(entries)]


async def build_export(store: Store, user_id: str, now: datetime | None = None) -> dict[str, Any]:
    """Everything the store holds about the user's personal account, as one JSON-ready document.

    Usage records and ledger entries are those before ``now`` (the moment of the export), oldest first.
    """
    user = await store.get_user(user_id)
    if user is None:
        raise NotFound(f"user {user_id} does not exist")
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    keys = await store.list_api_keys(user_id=user_id, include_revoked=True)
    memberships = []
    for org, role in await store.list_orgs_for_user(user_id):
        joined = next((m.created_at for m in await store.list_members(org.id) if m.user_id == user_id), None)
        memberships.append({"org_id": org.id, "org_name": org.name, "role": role, "created_at": iso(joined)})
    balance = await store.get_balance(user_id)
    usage = await _all_usage(store, user_id, moment)
    rolled_up = await _rolled_up_days(store, user_id, usage, moment)
    ledger = await _all_ledger(store, user_id, moment)
    profile = user_json(user)
    return {
        "object": "user.export",
        "version": EXPORT_VERSION,
        "exported_at": iso(moment),
        "user": profile,
        "balance": {"account_id": user_id, "balance_pico": balance, "balance_usd": format_usd(balance)},
        "api_keys": [key_json(k) for k in keys],
        "memberships": memberships,
        "usage": [usage_json(r) for r in usage],
        "usage_daily": rolled_up,
        "ledger": [ledger_json(e) for e in ledger],
    }


def export_json_bytes(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    text = str(value)
    if column in TEXT_COLUMNS and text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    return text


def section_rows(document: dict[str, Any], section: str) -> list[dict[str, Any]]:
    value = document[section]
    return [value] if isinstance(value, dict) else list(value)


def export_csv_zip(document: dict[str, Any]) -> bytes:
    """The document as a zip of one CSV per section."""
    exported = datetime.fromisoformat(document["exported_at"].replace("Z", "+00:00"))
    stamp = exported.timetuple()[:6]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for section, columns in SECTIONS:
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\r\n")
            writer.writerow(columns)
            for item in section_rows(document, section):
                writer.writerow([_cell(column, item.get(column)) for column in columns])
            info = zipfile.ZipInfo(f"{section}.csv", date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o600 << 16
            archive.writestr(info, text.getvalue().encode("utf-8"))
    return buffer.getvalue()


# ------------------------------------------------------------------ handlers

Handler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]


async def _own_account(request: web.Request, caller: Caller) -> str:
    """The path's user id if the caller is that user or the superadmin; 404 for anyone else's (not 403)."""
    user_id = request.match_info["user_id"]
    if not is_id(user_id):
        raise not_found("user")
    if not caller.superadmin and (caller.user is None or caller.user.id != user_id):
        raise not_found("user")
    if await request.app[STORE].get_user(user_id) is None:
        raise not_found("user")
    return user_id


async def delete_user(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    user_id = await _own_account(request, caller)
    result = await delete_account(request.app[STORE], request.app[FEED], user_id)
    return web.json_response(deletion_json(result))


async def export_user(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ("format",))
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise bad("format", "'format' must be json or csv.")
    user_id = await _own_account(request, caller)
    document = await build_export(request.app[STORE], user_id)
    if fmt == "json":
        return web.Response(body=export_json_bytes(document), content_type="application/json", headers={
            "Content-Disposition": f'attachment; filename="nexgate-export-{user_id}.json"'})
    return web.Response(body=export_csv_zip(document), content_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="nexgate-export-{user_id}.zip"'})


async def update_user(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    user_id = await _own_account(request, caller)
    data = await read_body(request, {"email": str, "name": str}, nullable=("email", "name"))
    if not data:
        raise bad(None, "Give 'email' and/or 'name' (null clears one).")
    changes: dict[str, str | None] = {}
    for field, value in data.items():
        try:
            changes[field] = profile_value(field, value)
        except ValueError as exc:
            raise bad(field, f"{exc}.") from None
    store = request.app[STORE]
    user = await store.get_user(user_id)
    if user is None or user.deleted_at is not None:
        raise not_found("user")
    return web.json_response(user_json(await correct_user(store, user, changes)))


async def _set_suspended(request: web.Request, caller: Caller, suspended: bool) -> web.Response:
    check_query(request, ())
    if not caller.superadmin:
        raise forbidden("Only the superadmin may suspend an account or lift a suspension (ask the operator).")
    user_id = await _own_account(request, caller)
    user, changed = await suspend_account(request.app[STORE], request.app[FEED], user_id, suspended)
    return web.json_response({**user_json(user), "changed": changed})


async def suspend_user(request: web.Request, caller: Caller) -> web.Response:
    return await _set_suspended(request, caller, True)


async def unsuspend_user(request: web.Request, caller: Caller) -> web.Response:
    return await _set_suspended(request, caller, False)


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("DELETE", "/users/{user_id}", delete_user),
    ("PATCH", "/users/{user_id}", update_user),
    ("POST", "/users/{user_id}/suspend", suspend_user),
    ("POST", "/users/{user_id}/unsuspend", unsuspend_user),
    ("GET", "/users/{user_id}/export", export_user),
)
"""(method, path under /admin/v1, handler): routed with the admin API's own (``api.add_routes``)."""
