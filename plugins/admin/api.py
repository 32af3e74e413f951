"""The admin HTTP API under ``/admin/v1/``: users, organizations, members, API keys and money.

Who calls is decided on every request from ``Authorization: Bearer <token>``:

* the bootstrap admin token (``auth.admin_token_sha256``) makes the caller the
  **superadmin**, who may do anything;
* otherwise, when ``auth.clerk`` is configured, a Clerk session token (RS256
  JWT, verified offline) makes the caller the local user whose ``external_id``
  is the token's ``sub``; that user is created on first sight.

Authorization uses the local memberships only (owner > admin > member); the
Clerk token's organization claims are shown in ``GET /me`` but grant nothing.
Rules, in short:

* a user sees and manages their own profile and personal keys; asking for
  anybody else's personal data answers 404, never 403, so ids are not probed;
* an organization is invisible (404) to non-members; members see it; admins
  and owners see its members and manage its keys; only owners manage members,
  and a member may leave; an organization always keeps an owner (409);
* organization admins never see members' personal keys.

Money (``/balance``, ``/transactions``, ``/usage``, ``/usage/totals``,
``/statements/{YYYY-MM}``) is per account, named by ``?account=``: a user sees
their own (the default), an organization's admins and owners see the
organization's, and the superadmin sees any. Nobody else's personal account
is visible: asking for it answers 404. An organization's admins get its usage as aggregates
(``/usage/totals``); its request rows (``/usage``) answer them 403 ``aggregates_only`` unless
``privacy.org_request_rows`` (see docs/privacy.md). Amounts are exact decimal strings
(``*_usd``) with the integer pico-USD beside them (``*_pico``), never floats.

Removing a member also revokes the organization keys that member created: they
saw the plaintext, and removal must end their access to the organization.

An organization's rate-limit overrides (``PATCH /orgs/{org_id}``, ``limits``)
are the operator's abuse control: only the superadmin sets them, and only the
superadmin's view of an organization shows them (members never see them, so
org owners cannot learn or raise their own ceiling through this API).

A key's own ``limits`` (``POST /keys``) may only tighten the operator's ``limits.key`` unless the
superadmin sets them: users and organization admins cannot raise or lift (0) them. The CLI acts
as the operator and may set anything.

Every authenticated call passes the abuse guard first (``app[ABUSE]``): a denied or banned IP is
refused 403, and a wrong admin token or an invalid session token counts toward the same bans as a
wrong API key on ``/v1/*``.

The OpenAPI document of this API is served at ``GET /admin/v1/openapi.json``
(without authentication: it describes the API, not its data).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Awaitable, Callable, Mapping

from aiohttp import web

from nexgate_proxy import GatewayError
from nexgate_proxy.accounts import CreatedKey, create_api_key, revoke_api_key, set_org_limits
from nexgate_proxy.abuse import request_ip
from nexgate_proxy.appkeys import ABUSE, CONFIG, FEED, STORE
from nexgate_plugins.auth.clerk import MAX_TOKEN_BYTES, ClerkIdentity, JWTError
from nexgate_plugins.credits import CREDITS
from nexgate_plugins.credits.grants import GrantError, check_reason, check_ref, grant, parse_usd
from nexgate_plugins.payments.unapplied import PAYMENT_STATS, UnappliedError, apply_unapplied, unapplied_json
from nexgate_plugins.credits.statements import (
    Account,
    FutureMonth,
    balance_json,
    build_statement,
    find_account,
    money,
    parse_month,
    parse_time,
    render_statement_html,
    statement_json,
    transaction_json,
    usage_json,
    usage_total_json,
)
from nexgate_proxy.store import (
    ROLES,
    ApiKeyRow,
    ChangeFeed,
    Conflict,
    Membership,
    NotFound,
    Organization,
    Store,
    User,
)
from nexgate_proxy.store.base import GROUP_BYS
from . import http
from .http import (
    bad,
    check_query,
    clean_text,
    errors_as_json,
    forbidden,
    is_id,
    not_found,
    query_bool,
    query_int,
    read_body,
)
from .openapi import build_openapi
from nexgate_plugins.auth.settings import AuthSettings
from nexgate_plugins.ratelimit.settings import LIMITS_SECTION, Quota, raised_limit
from nexgate_plugins.redaction import PRIVACY_SECTION

log = logging.getLogger("nexgate.admin")

PREFIX = "/admin/v1"
MAX_NAME_LENGTH = 200
MAX_EMAIL_LENGTH = 320
MAX_EXTERNAL_ID_LENGTH = 255
MAX_ALLOWED_MODELS = 256
MAX_LIMITS = 32
MAX_PAGE = 1000
MAX_OFFSET = 1_000_000_000
ADMIN_ROLES = frozenset({"owner", "admin"})

ORG_LIMIT_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Quota))
"""What the rate limiter reads from an organization's override: its quota (rpm, tpm, concurrent)."""
MAX_LIMIT_VALUE = 2**53 - 1
"""Counters are Lua numbers (doubles) in Redis: larger integers would not count exactly."""

_LIMIT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


# ------------------------------------------------------------ JSON views
# The API's resource shapes; the CLI prints the same ones with --json.


def iso(moment: datetime | None) -> str | None:
    """ISO-8601 in UTC with a ``Z``, or None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def user_json(user: User) -> dict[str, Any]:
    return {"object": "user", "id": user.id, "external_id": user.external_id, "email": user.email,
            "name": user.name, "created_at": iso(user.created_at), "deleted_at": iso(user.deleted_at),
            "suspended_at": iso(user.suspended_at)}


def org_json(org: Organization, role: str | None = None) -> dict[str, Any]:
    """``role`` is the caller's role in it (None for the superadmin, whose view alone has ``limits``)."""
    body: dict[str, Any] = {"object": "organization", "id": org.id, "name": org.name,
                            "created_at": iso(org.created_at), "role": role}
    if role is None:
        body["limits"] = dict(org.limits) if org.limits is not None else None
    return body


def member_json(membership: Membership, user: User | None) -> dict[str, Any]:
    return {"object": "organization.member", "org_id": membership.org_id, "user_id": membership.user_id,
            "role": membership.role, "email": user.email if user else None, "name": user.name if user else None,
            "created_at": iso(membership.created_at)}


def key_json(row: ApiKeyRow) -> dict[str, Any]:
    """Metadata only: never the secret hash, and the plaintext is added by the create call alone."""
    return {
        "object": "api_key", "id": row.id, "name": row.name, "prefix": row.prefix,
        "user_id": row.user_id, "org_id": row.org_id, "created_by": row.created_by,
        "created_at": iso(row.created_at), "last_used_at": iso(row.last_used_at),
        "expires_at": iso(row.expires_at), "revoked_at": iso(row.revoked_at),
        "allowed_models": list(row.allowed_models) if row.allowed_models is not None else None,
        "limits": dict(row.limits) if row.limits is not None else None,
    }


# ------------------------------------------------------- shared account rules


class PastExpiry(ValueError):
    """A well-formed ``expires_at`` that is not in the future."""


def parse_expires_at(value: str, now: datetime | None = None) -> datetime:
    """An ISO-8601 time with a timezone, in the future. ValueError (PastExpiry if past) says what is wrong."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError("must be an ISO-8601 date-time with a timezone, e.g. 2030-01-31T00:00:00Z") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("needs a timezone, e.g. 2030-01-31T00:00:00Z or +02:00")
    try:
        moment = moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError("is out of range") from None
    if moment <= (now or datetime.now(UTC)):
        raise PastExpiry("must be in the future")
    return moment


async def remove_member(store: Store, feed: ChangeFeed | None, org_id: str, user_id: str) -> list[str] | None:
    """Remove the membership, then revoke the org keys this member created.

    Returns the revoked key ids, or None when the user was not a member.
    Raises LastOwnerError (nothing changed) when the user is the last owner.
    """
    if not await store.remove_member(org_id, user_id):
        return None
    revoked = []
    for row in await store.list_api_keys(org_id=org_id):
        if row.created_by == user_id:
            await revoke_api_key(store, feed, row.id)
            revoked.append(row.id)
    return revoked


# ------------------------------------------------------------------ callers


@dataclass(frozen=True, slots=True)
class Caller:
    user: User | None
    """The local user; None for the superadmin."""
    superadmin: bool = False
    clerk: ClerkIdentity | None = None


@dataclass(frozen=True, slots=True)
class AdminSettings:
    auth: AuthSettings
    signed_in: dict[tuple[str, str], None] = dataclasses.field(default_factory=dict)
    """(Clerk user id, session id) pairs this process has seen: a new pair is a sign-in, when the profile
    is refreshed from the token's claims (not on every call: a correction made during the session stays)."""


MAX_SIGNED_IN = 100_000


ADMIN: web.AppKey[AdminSettings] = web.AppKey("nexgate_plugins.admin_api", AdminSettings)

_BEARER = {"WWW-Authenticate": 'Bearer realm="nexgate-admin"'}


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, code="invalid_token", headers=_BEARER)


async def authenticate(request: web.Request, token: str | None = None) -> Caller:
    """The caller, after the abuse guard: a denied or banned IP is refused, and a wrong admin token
    or an invalid session token counts toward the same bans as a wrong API key.

    ``token``: the admin or session token when it comes from elsewhere than the Authorization
    header (the dashboard's sign-in form or Clerk's ``__session`` cookie); checked the same way."""
    guard = request.app.get(ABUSE)
    ip = request_ip(request) if guard is not None else ""
    if guard is not None:
        refusal = guard.check(ip)
        if refusal is not None:
            raise refusal
    try:
        return await _caller(request, token)
    except GatewayError as exc:
        if guard is not None and exc.status == 401:
            pending = guard.count(ip, failed=True)
            if pending is not None:
                await pending
        raise


async def _caller(request: web.Request, token: str | None = None) -> Caller:
    settings = request.app[ADMIN].auth
    if token is None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = ""
    token = token.strip()
    if not token:
        raise _unauthorized("Send an admin token or a Clerk session token as 'Authorization: Bearer <token>'.")
    if len(token) > MAX_TOKEN_BYTES or not token.isascii():
        raise _unauthorized("Invalid admin token.")
    if settings.is_admin_token(token):
        return Caller(user=None, superadmin=True)
    if settings.clerk is None or token.count(".") != 2:
        raise _unauthorized("Invalid admin token.")
    try:
        identity = settings.clerk.verify(token)
    except JWTError as exc:
        log.info("admin API refused a session token: %s", exc.reason)
        raise _unauthorized(f"Invalid session token ({exc.reason}).") from None
    except Exception:  # a verifier bug must not become a 500 that hints at the token
        log.exception("session token verification failed unexpectedly")
        raise _unauthorized("Invalid session token.") from None
    admin = request.app[ADMIN]
    session = (identity.user_id, identity.session_id or "")
    sign_in = identity.session_id is None or session not in admin.signed_in
    user = await _clerk_user(request.app[STORE], identity, settings.clerk.profile_claims(identity), refresh=sign_in)
    if sign_in and identity.session_id is not None:
        if len(admin.signed_in) >= MAX_SIGNED_IN:
            admin.signed_in.pop(next(iter(admin.signed_in)))
        admin.signed_in[session] = None
    if user.deleted_at is not None:
        raise GatewayError(403, "This account has been deleted.", code="account_deleted")
    return Caller(user=user, clerk=identity)


async def _clerk_user(store: Store, identity: ClerkIdentity, claims: Mapping[str, Any], *,
                      refresh: bool = True) -> User:
    """The local user of a Clerk session, created on first sight; ``claims`` are the profile claims the
    verifier lets NexGate keep (``ClerkVerifier.profile_claims``: email, and name only when configured),
    written over the stored ones when ``refresh`` (a sign-in)."""
    external_id = identity.user_id
    if len(external_id) > MAX_EXTERNAL_ID_LENGTH or not clean_text(external_id):
        raise _unauthorized("Invalid session token (malformed).")
    email = _claim_text(claims.get("email"), MAX_EMAIL_LENGTH)
    name = _claim_text(claims.get("name"), MAX_NAME_LENGTH)
    user = await store.get_user_by_external_id(external_id)
    if user is not None:
        return await _refresh_from_claims(store, user, email, name) if refresh else user
    try:
        user = await store.create_user(external_id=external_id, email=email, name=name)
        log.info("created user %s on first sign-in", user.id)
        return user
    except Conflict:  # a concurrent first request created it
        user = await store.get_user_by_external_id(external_id)
        if user is None:
            raise
        return user


async def _refresh_from_claims(store: Store, user: User, email: str | None, name: str | None) -> User:
    """Correction at sign-in: a changed email (or name, when kept) in the token replaces the stored one.
    A claim the token lacks clears nothing."""
    new_email = email if email is not None and "@" in email else user.email
    new_name = name if name is not None else user.name
    if (new_email, new_name) == (user.email, user.name) or user.deleted_at is not None:
        return user
    try:
        user = await store.update_user(user.id, email=new_email, name=new_name)
    except NotFound:  # deleted meanwhile: the caller refuses it
        return user
    log.info("user %s: profile refreshed from the Clerk session", user.id)
    return user


def _claim_text(value: Any, max_length: int) -> str | None:
    if isinstance(value, str) and value and len(value) <= max_length and clean_text(value):
        return value
    return None


# --------------------------------------------------------------- validation


def _text(data: Mapping[str, Any], field: str, max_length: int, *, required: bool = False) -> str | None:
    """Up to max_length characters, not blank, no control characters; stored without surrounding spaces."""
    value = data.get(field)
    if value is None:
        if required:
            raise bad(field, f"'{field}' is required.")
        return None
    if len(value) > max_length:
        raise bad(field, f"'{field}' is longer than {max_length} characters.")
    value = value.strip()
    if not value:
        raise bad(field, f"'{field}' must not be empty.")
    if not clean_text(value):
        raise bad(field, f"'{field}' contains control characters or invalid Unicode.")
    return value


def _role(data: Mapping[str, Any], field: str = "role", default: str | None = None) -> str:
    role = data.get(field, default)
    if role is None:
        raise bad(field, f"'{field}' is required: one of {', '.join(ROLES)}.")
    if role not in ROLES:
        raise bad(field, f"'{field}' must be one of {', '.join(ROLES)}.")
    return role


def _body_id(data: Mapping[str, Any], field: str, *, required: bool = False) -> str | None:
    value = data.get(field)
    if value is None:
        if required:
            raise bad(field, f"'{field}' is required.")
        return None
    if not is_id(value):
        raise GatewayError(404, f"No such {_kind(field)}: '{field}' is not a known id.", code="not_found",
                           param=field)
    return value


def _kind(field: str) -> str:
    return "organization" if field.startswith("org") else "user" if "user" in field else "object"


def _allowed_models(data: Mapping[str, Any]) -> list[str] | None:
    models = data.get("allowed_models")
    if models is None:
        return None
    if not models:
        raise bad("allowed_models", "'allowed_models' must name at least one model; omit it to allow every model.")
    if len(models) > MAX_ALLOWED_MODELS:
        raise bad("allowed_models", f"'allowed_models' may name at most {MAX_ALLOWED_MODELS} models.")
    result: list[str] = []
    for model in models:
        if not isinstance(model, str) or not model.strip() or len(model) > MAX_NAME_LENGTH or not clean_text(model):
            raise bad("allowed_models", "'allowed_models' must be a list of model names (non-empty strings).")
        if model not in result:
            result.append(model)
    return result


def _limits(data: Mapping[str, Any]) -> dict[str, Any] | None:
    limits = data.get("limits")
    if limits is None:
        return None
    if len(limits) > MAX_LIMITS:
        raise bad("limits", f"'limits' may hold at most {MAX_LIMITS} entries.")
    for name, value in limits.items():
        if _LIMIT_NAME.fullmatch(name) is None:
            raise bad("limits", f"'limits' has an invalid name {name[:64]!r} (letters, digits, _ . : - only).")
        if isinstance(value, bool) or not (
            (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0)
            or (isinstance(value, str) and 0 < len(value) <= 64 and clean_text(value))
        ):
            raise bad("limits", f"'limits.{name}' must be a non-negative number or a short string.")
    return dict(limits)


def _lower_only(request: web.Request, limits: Mapping[str, Any]) -> None:
    """Users and organization admins may tighten a key's limits below the operator's, never raise or lift
    them (``limits.key.*``); only the superadmin (and the CLI, which is the operator) may."""
    try:
        ceiling = request.app[CONFIG].section(LIMITS_SECTION).key
    except LookupError:  # the ratelimit plugin is off: there are no limits to raise
        return
    problem = raised_limit(limits, ceiling)
    if problem is not None:
        name, why, is_raise = problem
        error = forbidden(f"'limits.{name}' {why}.") if is_raise else bad(None, f"'limits.{name}' {why}.")
        error.param = f"limits.{name}"
        raise error


def parse_org_limits(value: Any) -> dict[str, Any] | None:
    """An organization's overrides: a key's ``limits`` rules, limited to the names the rate limiter reads.

    None (and ``{}``) mean no override. Raises a 400 GatewayError naming ``limits``.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad("limits", "'limits' must be an object such as {\"rpm\": 600}, or null to remove the overrides.")
    limits = _limits({"limits": value}) or {}
    for name, number in limits.items():
        if isinstance(number, float) and number.is_integer() and abs(number) <= MAX_LIMIT_VALUE:
            limits[name] = number = int(number)  # JSON has one number type: 600.0 is the integer 600
        if name not in ORG_LIMIT_NAMES:
            known = ", ".join(ORG_LIMIT_NAMES)
            raise bad("limits", f"'limits.{name}' is not an organization limit (known: {known}).")
        if not isinstance(number, int) or number > MAX_LIMIT_VALUE:
            raise bad("limits", f"'limits.{name}' must be a whole number from 0 (no limit) to {MAX_LIMIT_VALUE}.")
    return limits or None


def _expires_at(data: Mapping[str, Any]) -> datetime | None:
    value = data.get("expires_at")
    if value is None:
        return None
    try:
        return parse_expires_at(value)
    except PastExpiry as exc:  # well-formed, as the document says: it conflicts with the clock, not the contract
        raise GatewayError(409, f"'expires_at' {exc}.", code="expires_at_passed", param="expires_at") from None
    except ValueError as exc:
        raise bad("expires_at", f"'expires_at' {exc}.") from None


def _page(request: web.Request) -> tuple[int, int]:
    return query_int(request, "limit", 100, 1, MAX_PAGE), query_int(request, "offset", 0, 0, MAX_OFFSET)


def _path_id(request: web.Request, name: str, what: str) -> str:
    value = request.match_info[name]
    if not is_id(value):
        raise not_found(what)
    return value


def _list(data: list[dict[str, Any]], has_more: bool = False) -> web.Response:
    return web.json_response({"object": "list", "data": data, "has_more": has_more})


# ------------------------------------------------------------ authorization


async def _org_access(request: web.Request, caller: Caller, org_id: str) -> tuple[Organization, str | None]:
    """The org and the caller's role in it (None for the superadmin). 404 for non-members."""
    store = request.app[STORE]
    org = await store.get_org(org_id)
    if org is None:
        raise not_found("organization")
    if caller.superadmin:
        return org, None
    assert caller.user is not None
    role = await store.get_role(org_id, caller.user.id)
    if role is None:
        raise not_found("organization")  # existence is not revealed to outsiders
    return org, role


def _require_admin(caller: Caller, role: str | None) -> None:
    if not caller.superadmin and role not in ADMIN_ROLES:
        raise forbidden("Only the organization's admins and owners may do this.")


def _require_owner(caller: Caller, role: str | None) -> None:
    if not caller.superadmin and role != "owner":
        raise forbidden("Only the organization's owners may do this.")


def _none_of_its_own(param: str, message: str) -> GatewayError:
    """The superadmin is nobody's user: what defaults to the caller's own (account, keys, ownership) is not found.

    A 404 naming the parameter to give, not a 400: the request is well-formed, only this caller has no such thing.
    """
    return GatewayError(404, message, code="not_found", param=param)


def _require_superadmin(caller: Caller) -> None:
    if not caller.superadmin:
        raise forbidden("Only the superadmin may do this.")


async def _usable_user(store: Store, user_id: str | None, param: str) -> User:
    user = await store.get_user(user_id) if user_id is not None else None
    if user is None or user.deleted_at is not None:
        raise GatewayError(404, "No such user.", code="not_found", param=param)
    return user


async def _key_access(request: web.Request, caller: Caller, key_id: str) -> ApiKeyRow:
    """The key if the caller may manage it. Others' personal keys answer 404, as unknown ones do."""
    store = request.app[STORE]
    row = await store.get_api_key(key_id)
    if row is None:
        raise not_found("API key")
    if caller.superadmin:
        return row
    assert caller.user is not None
    if row.user_id is not None:
        if row.user_id != caller.user.id:
            raise not_found("API key")
        return row
    role = await store.get_role(row.org_id or "", caller.user.id)
    if role is None:
        raise not_found("API key")
    if role not in ADMIN_ROLES:
        raise forbidden("Only the organization's admins and owners may manage its keys.")
    return row


# ----------------------------------------------------------------- handlers

Handler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]


async def get_me(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    orgs: list[dict[str, Any]] = []
    if caller.user is not None:
        orgs = [org_json(org, role) for org, role in await request.app[STORE].list_orgs_for_user(caller.user.id)]
    clerk = None
    if caller.clerk is not None:
        clerk = {"user_id": caller.clerk.user_id, "session_id": caller.clerk.session_id,
                 "org_id": caller.clerk.org_id, "org_role": caller.clerk.org_role, "org_slug": caller.clerk.org_slug}
    return web.json_response({
        "object": "caller", "superadmin": caller.superadmin,
        "user": user_json(caller.user) if caller.user else None, "orgs": orgs, "clerk": clerk,
    })


async def create_user(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    _require_superadmin(caller)
    data = await read_body(request, {"external_id": str, "email": str, "name": str})
    email = _text(data, "email", MAX_EMAIL_LENGTH)
    if email is not None and "@" not in email:
        raise bad("email", "'email' is not an email address.")
    user = await request.app[STORE].create_user(
        external_id=_text(data, "external_id", MAX_EXTERNAL_ID_LENGTH), email=email,
        name=_text(data, "name", MAX_NAME_LENGTH))
    return web.json_response(user_json(user), status=201)


async def list_users(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ("limit", "offset", "include_deleted"))
    _require_superadmin(caller)
    limit, offset = _page(request)
    users = await request.app[STORE].list_users(limit + 1, offset, include_deleted=query_bool(request, "include_deleted"))
    return _list([user_json(u) for u in users[:limit]], len(users) > limit)


async def get_user(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    user_id = _path_id(request, "user_id", "user")
    if not caller.superadmin and (caller.user is None or caller.user.id != user_id):
        raise not_found("user")
    user = await request.app[STORE].get_user(user_id)
    if user is None:
        raise not_found("user")
    return web.json_response(user_json(user))


async def create_org(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    data = await read_body(request, {"name": str, "owner_user_id": str})
    name = _text(data, "name", MAX_NAME_LENGTH, required=True)
    assert name is not None
    owner_id = _body_id(data, "owner_user_id")
    store = request.app[STORE]
    if caller.superadmin:
        if owner_id is None:
            raise _none_of_its_own("owner_user_id", "The superadmin owns no organizations: give owner_user_id.")
        owner = await _usable_user(store, owner_id, "owner_user_id")
    else:
        assert caller.user is not None
        if owner_id is not None and owner_id != caller.user.id:
            raise GatewayError(403, "Only the superadmin may create an organization owned by someone else.",
                               code="forbidden", param="owner_user_id")
        owner = caller.user
    org = await store.create_org(name, owner.id)
    return web.json_response(org_json(org, None if caller.superadmin else "owner"), status=201)


async def list_orgs(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ("limit", "offset"))
    limit, offset = _page(request)
    store = request.app[STORE]
    if caller.superadmin:
        orgs = await store.list_orgs(limit + 1, offset)
        return _list([org_json(o) for o in orgs[:limit]], len(orgs) > limit)
    assert caller.user is not None
    mine = (await store.list_orgs_for_user(caller.user.id))[offset:offset + limit + 1]
    return _list([org_json(o, role) for o, role in mine[:limit]], len(mine) > limit)


async def get_org(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    org, role = await _org_access(request, caller, _path_id(request, "org_id", "organization"))
    return web.json_response(org_json(org, role))


async def update_org(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    org, _ = await _org_access(request, caller, _path_id(request, "org_id", "organization"))
    _require_superadmin(caller)  # limits are the operator's abuse control: owners must not raise their own
    data = await read_body(request, {"limits": dict}, nullable=("limits",))
    if "limits" not in data:
        raise bad("limits", "'limits' is required: an object such as {\"rpm\": 600}, or null to remove them.")
    limits = parse_org_limits(data["limits"])
    updated = await set_org_limits(request.app[STORE], request.app[FEED], org.id, limits)
    log.info("organization %s limits set to %s", org.id, limits)
    return web.json_response(org_json(updated))


async def list_members(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    org, role = await _org_access(request, caller, _path_id(request, "org_id", "organization"))
    _require_admin(caller, role)
    store = request.app[STORE]
    members = await store.list_members(org.id)
    users = await asyncio.gather(*[store.get_user(m.user_id) for m in members])
    return _list([member_json(m, u) for m, u in zip(members, users)])


async def add_member(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    org, role = await _org_access(request, caller, _path_id(request, "org_id", "organization"))
    _require_owner(caller, role)
    data = await read_body(request, {"user_id": str, "role": str})
    user_id = _body_id(data, "user_id", required=True)
    new_role = _role(data, default="member")
    store = request.app[STORE]
    user = await _usable_user(store, user_id, "user_id")
    membership = await store.add_member(org.id, user.id, new_role)
    return web.json_response(member_json(membership, user), status=201)


async def update_member(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    org, role = await _org_access(request, caller, _path_id(request, "org_id", "organization"))
    _require_owner(caller, role)
    user_id = _path_id(request, "user_id", "member")
    data = await read_body(request, {"role": str})
    store = request.app[STORE]
    try:
        membership = await store.set_member_role(org.id, user_id, _role(data))
    except NotFound:
        raise not_found("member") from None
    return web.json_response(member_json(membership, await store.get_user(user_id)))


async def delete_member(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    org_id, user_id = _path_id(request, "org_id", "organization"), _path_id(request, "user_id", "member")
    org, revoked = await remove_member_as(request, caller, org_id, user_id)
    return web.json_response({"object": "organization.member.deleted", "org_id": org.id, "user_id": user_id,
                              "deleted": True, "revoked_key_ids": revoked})


KEY_FIELDS: dict[str, type] = {"name": str, "org_id": str, "user_id": str, "expires_at": str,
                               "allowed_models": list, "limits": dict}


async def remove_member_as(request: web.Request, caller: Caller, org_id: str,
                           user_id: str) -> tuple[Organization, list[str]]:
    """A member leaves, or an owner removes them (``DELETE .../members/{user_id}``, the dashboard's form too)."""
    org, role = await _org_access(request, caller, org_id)
    leaving = caller.user is not None and caller.user.id == user_id
    if not leaving:
        _require_owner(caller, role)
    revoked = await remove_member(request.app[STORE], request.app[FEED], org.id, user_id)
    if revoked is None:
        raise not_found("member")
    return org, revoked


async def create_key(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    created = await create_key_for(request, caller, await read_body(request, KEY_FIELDS))
    body = key_json(created.row)
    body["key"] = created.plaintext
    response = web.json_response(body, status=201)
    response.headers["Cache-Control"] = "no-store"
    return response


async def create_key_for(request: web.Request, caller: Caller, data: Mapping[str, Any]) -> CreatedKey:
    """A new key as ``POST /keys`` makes it (its body's fields, checked): the dashboard's form uses it too."""
    if caller.user is not None and caller.user.suspended_at is not None:  # restriction: see privacy.py
        raise GatewayError(403, "This account is suspended: it cannot create API keys until the operator lifts "
                           "the suspension.", code="account_suspended")
    name = _text(data, "name", MAX_NAME_LENGTH, required=True)
    assert name is not None
    org_id = _body_id(data, "org_id")
    user_id = _body_id(data, "user_id")
    if org_id is not None and user_id is not None:
        raise bad("user_id", "Give org_id for an organization key or user_id for a personal key, not both.")
    expires_at = _expires_at(data)
    allowed_models = _allowed_models(data)
    limits = _limits(data)
    store = request.app[STORE]
    if org_id is not None:
        try:
            _, role = await _org_access(request, caller, org_id)
        except GatewayError as exc:
            exc.param = "org_id"
            raise
        _require_admin(caller, role)
        owner: dict[str, str | None] = {"org_id": org_id}
    elif caller.superadmin:
        if user_id is None:
            raise _none_of_its_own("user_id", "The superadmin has no personal keys: give user_id or org_id.")
        owner = {"user_id": (await _usable_user(store, user_id, "user_id")).id}
    else:
        assert caller.user is not None
        if user_id is not None and user_id != caller.user.id:
            raise GatewayError(404, "No such user.", code="not_found", param="user_id")
        owner = {"user_id": caller.user.id}
    if limits and not caller.superadmin:
        _lower_only(request, limits)
    created = await create_api_key(
        store, name=name, **owner, created_by=caller.user.id if caller.user else None, expires_at=expires_at,
        allowed_models=allowed_models, limits=limits, bcrypt_rounds=request.app[ADMIN].auth.bcrypt_rounds)
    log.info("API key %s created (%s)", created.row.id, created.row.prefix)
    return created


async def list_keys(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ("user_id", "include_revoked"))
    user_id = request.query.get("user_id")
    if caller.superadmin:
        if user_id is None:
            raise _none_of_its_own("user_id", "The superadmin has no personal keys: pass ?user_id=, or list an "
                                              "organization's keys at /admin/v1/orgs/{org_id}/keys.")
        if not is_id(user_id) or await request.app[STORE].get_user(user_id) is None:
            raise GatewayError(404, "No such user.", code="not_found", param="user_id")
    else:
        assert caller.user is not None
        if user_id is not None and user_id != caller.user.id:
            raise GatewayError(404, "No such user.", code="not_found", param="user_id")
        user_id = caller.user.id
    rows = await request.app[STORE].list_api_keys(user_id=user_id,
                                                  include_revoked=query_bool(request, "include_revoked"))
    return _list([key_json(r) for r in rows])


async def list_org_keys(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ("include_revoked",))
    org, role = await _org_access(request, caller, _path_id(request, "org_id", "organization"))
    _require_admin(caller, role)
    rows = await request.app[STORE].list_api_keys(org_id=org.id,
                                                  include_revoked=query_bool(request, "include_revoked"))
    return _list([key_json(r) for r in rows])


async def get_key(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    row = await _key_access(request, caller, _path_id(request, "key_id", "API key"))
    return web.json_response(key_json(row))


async def delete_key(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    row = await _key_access(request, caller, _path_id(request, "key_id", "API key"))
    store = request.app[STORE]
    await revoke_api_key(store, request.app[FEED], row.id)
    log.info("API key %s revoked", row.id)
    return web.json_response(key_json(await store.get_api_key(row.id) or row))


# ------------------------------------------------------------------ money


async def _account(request: web.Request, caller: Caller) -> Account:
    """The account named by ``?account=`` (default: the caller's own) if the caller may see its money.

    Own personal account: yes. An organization: its admins and owners (403 for
    plain members, 404 for outsiders). Anybody else's personal account: 404, as
    an unknown id. The superadmin: any existing account, and must name it.
    """
    store = request.app[STORE]
    account_id = request.query.get("account")
    if account_id is None:
        if caller.superadmin:
            raise _none_of_its_own("account", "The superadmin has no account of its own: pass "
                                              "?account=<user or organization id>.")
        assert caller.user is not None
        account_id = caller.user.id
    if not is_id(account_id):
        raise GatewayError(404, "No such account.", code="not_found", param="account")
    if caller.superadmin:
        account = await find_account(store, account_id)
        if account is None:
            raise GatewayError(404, "No such account.", code="not_found", param="account")
        return account
    assert caller.user is not None
    if account_id == caller.user.id:
        user = caller.user
        return Account(user.id, "user", user.name or user.email)
    org = await store.get_org(account_id)
    if org is None:
        raise GatewayError(404, "No such account.", code="not_found", param="account")
    role = await store.get_role(org.id, caller.user.id)
    if role is None:
        raise GatewayError(404, "No such account.", code="not_found", param="account")
    if role not in ADMIN_ROLES:
        raise forbidden("Only the organization's admins and owners may see its balance, transactions and usage.")
    return Account(org.id, "organization", org.name)


def _query_time(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return parse_time(raw)
    except ValueError as exc:
        raise bad(name, f"'{name}' {exc}.") from None


def _period(request: web.Request) -> tuple[datetime | None, datetime | None]:
    return _query_time(request, "since"), _query_time(request, "until")  # until <= since: an empty period


def _usage_filters(request: web.Request) -> dict[str, Any]:
    since, until = _period(request)
    model = request.query.get("model")
    if model is not None and (not model or len(model) > MAX_NAME_LENGTH or not clean_text(model)):
        raise bad("model", "'model' must be a model name.")
    key_id = request.query.get("key_id")
    if key_id is not None and not is_id(key_id):
        raise bad("key_id", "'key_id' must be an API key id.")
    return {"since": since, "until": until, "model": model, "key_id": key_id}


async def get_balance(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ("account",))
    account = await _account(request, caller)
    balance = await request.app[STORE].get_balance(account.id)
    return web.json_response(balance_json(account.id, account.type, balance))


async def list_transactions(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ("account", "since", "until", "limit", "offset"))
    account = await _account(request, caller)
    since, until = _period(request)
    limit, offset = _page(request)
    entries = await request.app[STORE].list_ledger(account.id, since=since, until=until, limit=limit + 1,
                                                   offset=offset)
    return _list([transaction_json(e) for e in entries[:limit]], len(entries) > limit)


async def list_usage(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ("account", "since", "until", "model", "key_id", "limit", "offset"))
    account = await _account(request, caller)
    _request_rows_allowed(request, caller, account)
    filters = _usage_filters(request)
    limit, offset = _page(request)
    rows = await request.app[STORE].list_usage(account_id=account.id, **filters, limit=limit + 1, offset=offset)
    return _list([usage_json(r) for r in rows[:limit]], len(rows) > limit)


# -- privacy: organization admins see aggregates, not request rows (privacy.org_request_rows)


def _request_rows_allowed(request: web.Request, caller: Caller, account: Account) -> None:
    """An organization's request-level rows are for the superadmin; its admins get 403
    ``aggregates_only`` unless the operator set ``privacy.org_request_rows: true`` (the privacy
    policy promises them aggregate usage: ``/usage/totals`` per key, model or day)."""
    if caller.superadmin or account.type != "organization":
        return
    try:
        allowed = request.app[CONFIG].section(PRIVACY_SECTION).org_request_rows
    except LookupError:
        allowed = False
    if not allowed:
        raise GatewayError(403, "Organization admins see aggregate usage only: use /admin/v1/usage/totals "
                           "(group_by=key, model or day).", code="aggregates_only")


async def get_usage_totals(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ("account", "since", "until", "model", "key_id", "group_by"))
    account = await _account(request, caller)
    filters = _usage_filters(request)
    group_by = request.query.get("group_by", "day")
    if group_by not in GROUP_BYS:
        raise bad("group_by", f"'group_by' must be one of {', '.join(GROUP_BYS)}.")
    totals = await request.app[STORE].usage_totals(account_id=account.id, **filters,
                                                   group_by=group_by)  # type: ignore[arg-type]
    return _list([usage_total_json(t, group_by) for t in totals])


_HTML_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def get_statement(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ("account", "format"))
    month = request.match_info["month"]
    try:
        parse_month(month)
    except ValueError as exc:
        raise bad("month", f"The statement period {exc}.") from None
    fmt = request.query.get("format")
    if fmt is None:
        fmt = "html" if "text/html" in request.headers.get("Accept", "") else "json"
    if fmt not in ("json", "html"):
        raise bad("format", "'format' must be json or html.")
    account = await _account(request, caller)
    try:
        statement = await build_statement(request.app[STORE], account, month)
    except FutureMonth as exc:  # 404, not 400: the month is well formed, its statement does not exist yet
        raise GatewayError(404, f"No statement for {exc}.", code="month_not_started", param="month") from None
    if fmt == "json":
        return web.json_response(statement_json(statement))
    return web.Response(text=render_statement_html(statement), content_type="text/html", charset="utf-8",
                        headers=_HTML_HEADERS)


# ------------------------------------------- credits and unapplied payments (superadmin)
# One implementation with the CLI: nexgate_plugins.credits.grants and nexgate_plugins.payments.


async def _grant_or_adjust(request: web.Request, caller: Caller, kind: str) -> web.Response:
    check_query(request, ())
    _require_superadmin(caller)
    data = await read_body(request, {"account_id": str, "amount_usd": str, "reason": str, "ref": str})
    for field in ("account_id", "amount_usd", "reason"):
        if field not in data:
            raise bad(field, f"'{field}' is required.")
    try:
        amount = parse_usd(data["amount_usd"], signed=kind == "adjustment")
        reason = check_reason(data["reason"])
        ref = check_ref(data.get("ref"))
    except GrantError as exc:
        raise bad("amount_usd" if exc.field == "amount" else exc.field, f"{exc.message}.") from None
    store = request.app[STORE]
    account = await find_account(store, data["account_id"]) if is_id(data["account_id"]) else None
    if account is None:
        raise GatewayError(404, "No such account.", code="not_found", param="account_id")
    credits = request.app.get(CREDITS)
    try:
        done = await grant(store, credits.state if credits else None, account.id, amount, reason, ref, kind=kind)
    except GrantError as exc:  # a ref used for something else, or a balance out of range
        raise GatewayError(409, f"{exc.message}.", code="conflict",
                           param="amount_usd" if exc.field == "amount" else exc.field) from None
    if done.applied:
        await request.app[FEED].deliver_now()  # this instance's cached balance at once
    return web.json_response({
        "object": kind, "applied": done.applied, "account_id": account.id, "account_type": account.type,
        "external_id": done.entry.external_id, "reason": reason, **money("amount", amount),
        **money("balance", done.balance_pico)}, status=201 if done.applied else 200)


async def create_grant(request: web.Request, caller: Caller) -> web.Response:
    return await _grant_or_adjust(request, caller, "grant")


async def create_adjustment(request: web.Request, caller: Caller) -> web.Response:
    return await _grant_or_adjust(request, caller, "adjustment")


async def list_unapplied_payments(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ("include_applied", "limit", "offset"))
    _require_superadmin(caller)
    limit, offset = _page(request)
    held = await request.app[STORE].list_unapplied_payments(include_applied=query_bool(request, "include_applied"),
                                                            limit=limit + 1, offset=offset)
    return _list([unapplied_json(p) for p in held[:limit]], len(held) > limit)


async def apply_unapplied_payment(request: web.Request, caller: Caller) -> web.Response:
    check_query(request, ())
    _require_superadmin(caller)
    payment_id = _path_id(request, "payment_id", "unapplied payment")
    data = await read_body(request, {"account_id": str})
    account_id = data.get("account_id")
    if account_id is None:
        raise bad("account_id", "'account_id' is required.")
    if not is_id(account_id):
        raise GatewayError(404, "No such account.", code="not_found", param="account_id")
    store = request.app[STORE]
    credits = request.app.get(CREDITS)
    try:
        applied, held = await apply_unapplied(store, credits.state if credits else None, payment_id, account_id)
    except UnappliedError as exc:
        raise GatewayError(exc.status, exc.message, code="not_found" if exc.status == 404 else "conflict",
                           param=exc.param) from None
    if applied:
        await request.app[FEED].deliver_now()
        stats = request.app.get(PAYMENT_STATS)
        if stats is not None:
            await stats.refresh(store)
    return web.json_response({**unapplied_json(held), "applied": applied,
                              **money("balance", await store.get_balance(account_id))})


CREDIT_ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("POST", "/credits/grants", create_grant),
    ("POST", "/credits/adjustments", create_adjustment),
    ("GET", "/payments/unapplied", list_unapplied_payments),
    ("POST", "/payments/unapplied/{payment_id}/apply", apply_unapplied_payment),
)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(build_openapi())


# ------------------------------------------------------------------ routing

ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/me", get_me),
    ("POST", "/users", create_user),
    ("GET", "/users", list_users),
    ("GET", "/users/{user_id}", get_user),
    ("POST", "/orgs", create_org),
    ("GET", "/orgs", list_orgs),
    ("GET", "/orgs/{org_id}", get_org),
    ("PATCH", "/orgs/{org_id}", update_org),
    ("GET", "/orgs/{org_id}/members", list_members),
    ("POST", "/orgs/{org_id}/members", add_member),
    ("PATCH", "/orgs/{org_id}/members/{user_id}", update_member),
    ("DELETE", "/orgs/{org_id}/members/{user_id}", delete_member),
    ("GET", "/orgs/{org_id}/keys", list_org_keys),
    ("POST", "/keys", create_key),
    ("GET", "/keys", list_keys),
    ("GET", "/keys/{key_id}", get_key),
    ("DELETE", "/keys/{key_id}", delete_key),
    ("GET", "/balance", get_balance),
    ("GET", "/transactions", list_transactions),
    ("GET", "/usage", list_usage),
    ("GET", "/usage/totals", get_usage_totals),
    ("GET", "/statements/{month}", get_statement),
    *CREDIT_ROUTES,
)
"""(method, path under /admin/v1, handler): the authenticated endpoints."""


def _authenticated(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        response = await handler(request, await authenticate(request))
        response.headers["Cache-Control"] = "no-store"
        return response

    handle.__name__ = f"admin_{handler.__name__}"
    return errors_as_json(handle)


async def _unknown(request: web.Request) -> web.Response:
    return GatewayError(404, f"Unknown admin API path {request.path!r}; see {PREFIX}/openapi.json.",
                        code="unknown_url").response()


def add_routes(app: web.Application, *more: tuple[tuple[str, str, Handler], ...]) -> None:
    """This module's ROUTES and ``more`` (the privacy endpoints): one resource per path, every method on it."""
    routes = [(method, path, _authenticated(handler)) for method, path, handler in (*ROUTES, *(r for m in more for r in m))]
    http.add_routes(app, PREFIX, [*routes, ("GET", "/openapi.json", errors_as_json(openapi))])
    app.router.add_route("*", PREFIX + "/{tail:.*}", _unknown)
