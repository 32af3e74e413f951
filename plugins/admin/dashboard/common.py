"""What every dashboard page shares: the handler wrapper (session, CSRF, errors as HTML pages, security
headers), the caller's accounts, and keyset pagination over newest-first store listings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

from aiohttp import web
from multidict import MultiDictProxy

from nexgate_proxy import GatewayError
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.store import Conflict, LastOwnerError, NotFound, StoreError

from .. import api
from .session import Session, SignInRequired, check_csrf, current
from .settings import DashboardSettings
from .views import error_page

log = logging.getLogger("nexgate.dashboard")

DASHBOARD: web.AppKey[DashboardSettings] = web.AppKey("nexgate_plugins.dashboard", DashboardSettings)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin", "Cross-Origin-Opener-Policy": "same-origin"}

Form = MultiDictProxy[Any]
GetPage = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]
PostPage = Callable[[web.Request, Session, Form], Awaitable[web.StreamResponse]]


def base(request: web.Request) -> str:
    return request.app[DASHBOARD].path


def secure_headers(response: web.StreamResponse, csp: str = CSP) -> web.StreamResponse:
    response.headers.setdefault("Content-Security-Policy", csp)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers["Cache-Control"] = "no-store"  # every page shows someone's private data
    return response


def _status_of(exc: Exception) -> tuple[int, str]:
    """The admin API's mapping of failures (``http.errors_as_json``), for HTML pages."""
    if isinstance(exc, GatewayError):
        return exc.status, exc.message
    if isinstance(exc, NotFound):
        return 404, str(exc)
    if isinstance(exc, LastOwnerError):
        return 409, f"{exc}: give the organization another owner first."
    if isinstance(exc, Conflict):
        return 409, f"Conflict: {exc}."
    log.error("dashboard: the store failed: %s", type(exc).__name__)
    return 503, "The account database is unavailable; retry shortly."


def endpoint(handler: GetPage | PostPage, method: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A page: signed in (else to the sign-in form), a POST's CSRF token checked, failures as HTML pages."""
    async def handle(request: web.Request) -> web.StreamResponse:
        settings = request.app[DASHBOARD]
        session: Session | None = None
        try:
            session = await current(request, settings)
            if method == "POST":
                form = await request.post()
                check_csrf(request, session, form.get("csrf") if isinstance(form.get("csrf"), str) else None)
                response = await handler(request, session, form)  # type: ignore[call-arg]
            else:
                response = await handler(request, session)  # type: ignore[call-arg]
        except SignInRequired:
            if method != "GET":
                response = error_page(settings.path, None, 403, "Sign in first: this form needs a session.")
            else:
                raise web.HTTPSeeOther(f"{settings.path}/login?next={_quote(request.path_qs)}")
        except web.HTTPException:
            raise
        except (GatewayError, NotFound, Conflict, StoreError) as exc:
            status, message = _status_of(exc)
            response = error_page(settings.path, session, status, message)
        except Exception:
            log.exception("dashboard: unexpected error on %s %s", request.method, request.path)
            response = error_page(settings.path, session, 500, "The dashboard failed to handle this request.")
        return secure_headers(response)

    handle.__name__ = f"dashboard_{handler.__name__}"
    return handle


def _quote(text: str) -> str:
    from urllib.parse import quote
    return quote(text, safe="")


def redirect(location: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(location)


# ------------------------------------------------------------------ accounts


async def accounts_of(request: web.Request, session: Session) -> list[tuple[str, str]]:
    """(account id, label) the caller may see the money of: their own, and orgs they administer."""
    caller = session.caller
    if caller.user is None:
        return []
    result = [(caller.user.id, "Personal")]
    for org, role in await request.app[STORE].list_orgs_for_user(caller.user.id):
        if role in api.ADMIN_ROLES:
            result.append((org.id, f"{org.name} (organization)"))
    return result


def text_field(form: Form, name: str) -> str | None:
    value = form.get(name)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


# ------------------------------------------------------------------ keyset pages

T = TypeVar("T")
_TICK = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a newest-first page ended: the last row's time and id, and how many rows at that time were passed
    (the next page skips just those: an OFFSET within one microsecond, never into the whole listing)."""
    at: datetime
    id: str
    ties: int = 1

    def text(self) -> str:
        return f"{self.at.isoformat()}~{self.ties}~{self.id}"

    @staticmethod
    def parse(text: str | None) -> Cursor | None:
        parts = (text or "").split("~", 2)
        if len(parts) != 3 or len(text or "") > 200 or not parts[1].isdigit() or not 0 < int(parts[1]) <= 10**6:
            return None
        try:
            moment = datetime.fromisoformat(parts[0])
        except ValueError:
            return None
        if moment.tzinfo is None:
            return None
        return Cursor(moment, parts[2], int(parts[1]))


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    rows: list[T]
    next: Cursor | None


Fetch = Callable[[datetime | None, int, int], Awaitable[Sequence[T]]]


async def keyset(fetch: Fetch[T], key: Callable[[T], tuple[datetime, str]], until: datetime | None,
                 cursor: Cursor | None, limit: int, keep: Callable[[T], bool] = lambda row: True,
                 scan: int = 5000, batch: int = 200) -> Page[T]:
    """Up to ``limit`` rows after ``cursor`` that ``keep`` accepts, newest first, reading at most ``scan``.

    ``fetch(until, n, offset)`` lists ``n`` rows before ``until`` (exclusive) ordered by (time, id)
    descending, skipping ``offset``: one indexed range read per batch however deep the page.
    """
    rows: list[T] = []
    scanned = 0
    position = cursor
    while scanned < scan:
        bound, skip = (until, 0) if position is None else (position.at + _TICK, position.ties)
        got = await fetch(bound, batch + 1, skip)
        for index, row in enumerate(got[:batch]):
            scanned += 1
            at, row_id = key(row)
            ties = position.ties + 1 if position is not None and at == position.at else 1
            position = Cursor(at, row_id, ties)
            if keep(row):
                rows.append(row)
                if len(rows) == limit:
                    return Page(rows, position if index + 1 < len(got) else None)
        if len(got) <= batch:
            return Page(rows, None)
    return Page(rows, position)
