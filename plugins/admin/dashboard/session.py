"""Dashboard sessions: a signed cookie naming the caller, and the CSRF token bound to it.

Sign-in checks a token exactly as the admin API does (``api.authenticate``: the abuse guard, the
bootstrap admin token, a Clerk session JWT verified offline). What it proves is then kept in our own
cookie, ``<kind>.<subject>.<expires>.<nonce>.<mac>``, HMAC-SHA256 under ``dashboard.session_secret``:
HttpOnly, SameSite, Secure over HTTPS, scoped to the dashboard's path. Every request re-reads the
user from the store (a deleted account's session ends at once); an operator session also binds the
admin token's hash, so rotating the token ends every operator session.

A request may instead carry ``Authorization: Bearer <token>`` (scripts, tests): it is checked on
every request and needs no CSRF token, since a browser never adds that header on its own. Every
state-changing form carries ``csrf`` = HMAC(session nonce); a POST without the right one is refused
403, as is one whose ``Origin`` is another site. Before sign-in, the login form uses a
double-submit cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from nexgate_proxy import GatewayError
from nexgate_proxy.appkeys import STORE

from .. import api
from ..api import Caller
from .settings import DashboardSettings

CLERK_COOKIE = "__session"
LOGIN_CSRF_COOKIE = "nexgate_dashboard_login"


@dataclass(frozen=True, slots=True)
class Session:
    caller: Caller
    csrf: str
    """The token this session's forms carry; empty for bearer requests, which need none."""


class SignInRequired(Exception):
    """No valid session: the page redirects to the sign-in form."""


def _mac(settings: DashboardSettings, payload: str, admin_hash: str) -> str:
    return hmac.new(settings.session_secret, f"{payload}|{admin_hash}".encode(), hashlib.sha256).hexdigest()


def _admin_hash(request: web.Request) -> str:
    return request.app[api.ADMIN].auth.admin_token_sha256 or ""


def csrf_for(settings: DashboardSettings, nonce: str) -> str:
    return hmac.new(settings.session_secret, f"csrf|{nonce}".encode(), hashlib.sha256).hexdigest()[:32]


def issue(request: web.Request, settings: DashboardSettings, caller: Caller, response: web.StreamResponse) -> None:
    """Set the session cookie for ``caller`` on ``response``."""
    kind, subject = ("o", "-") if caller.superadmin else ("u", caller.user.id if caller.user else "-")
    expires = int(time.time()) + settings.session_hours * 3600
    payload = f"{kind}.{subject}.{expires}.{secrets.token_hex(16)}"
    value = f"{payload}.{_mac(settings, payload, _admin_hash(request) if kind == 'o' else '')}"
    response.set_cookie(settings.cookie_name, value, max_age=settings.session_hours * 3600, path=settings.path,
                        httponly=True, samesite=settings.cookie_samesite, secure=secure(request, settings))


def clear(request: web.Request, settings: DashboardSettings, response: web.StreamResponse) -> None:
    response.del_cookie(settings.cookie_name, path=settings.path, secure=secure(request, settings),
                        httponly=True, samesite=settings.cookie_samesite)


def secure(request: web.Request, settings: DashboardSettings) -> bool:
    return settings.cookie_secure == "always" or (settings.cookie_secure == "auto" and request.secure)


async def _from_cookie(request: web.Request, settings: DashboardSettings) -> Session | None:
    value = request.cookies.get(settings.cookie_name)
    if not value or len(value) > 512:
        return None
    parts = value.split(".")
    if len(parts) != 5:
        return None
    kind, subject, expires, nonce, mac = parts
    payload = ".".join(parts[:4])
    if kind not in ("o", "u") or not expires.isdigit() or int(expires) < time.time():
        return None
    admin_hash = _admin_hash(request) if kind == "o" else ""
    if kind == "o" and not admin_hash:  # the admin token was removed from the config
        return None
    if not hmac.compare_digest(mac, _mac(settings, payload, admin_hash)):
        return None
    if kind == "o":
        caller = Caller(user=None, superadmin=True)
    else:
        user = await request.app[STORE].get_user(subject)
        if user is None or user.deleted_at is not None:
            return None
        caller = Caller(user=user)
    return Session(caller, csrf_for(settings, nonce))


async def current(request: web.Request, settings: DashboardSettings) -> Session:
    """The signed-in caller, or SignInRequired. A bearer token wins over the cookie."""
    if request.headers.get("Authorization", "").lower().startswith("bearer "):
        return Session(await api.authenticate(request), "")
    session = await _from_cookie(request, settings)
    if session is None:
        raise SignInRequired()
    return session


def check_origin(request: web.Request) -> None:
    """A POST from another site is refused, whatever it carries (defence in depth beside the token)."""
    origin = request.headers.get("Origin")
    # the host only: behind a TLS-terminating proxy the browser's https origin reaches us as http
    if origin is not None and origin != "null" and urlsplit(origin).netloc != request.host:
        raise GatewayError(403, "This form was posted from another site.", code="csrf_failed")
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        raise GatewayError(403, "This form was posted from another site.", code="csrf_failed")


def check_csrf(request: web.Request, session: Session, form_token: str | None) -> None:
    check_origin(request)
    if not session.csrf:  # a bearer request: no cookie, no CSRF
        return
    if not form_token or not hmac.compare_digest(form_token, session.csrf):
        raise GatewayError(403, "The form's security token is missing or stale: reload the page and try again.",
                           code="csrf_failed")
