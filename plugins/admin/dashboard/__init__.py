"""The dashboard: a server-rendered web app under ``dashboard.path`` (``/dashboard``) for users,
organization admins and the operator, on the admin API's own functions (one rule, one place).

* ``session``: sign-in (Clerk ``__session`` cookie, bearer JWT or the admin token, checked by
  ``api.authenticate``), the signed session cookie and CSRF tokens;
* ``common``: the page wrapper (errors as HTML, security headers), keyset pagination;
* ``pages_me``: sign-in, API keys, privacy; ``pages_account``: overview, usage, credits,
  statements and invoices; ``pages_org``: organizations; ``pages_operator``: the operator's pages;
* ``markup``: auto-escaping HTML helper; ``charts``: SVG charts; ``views``: the page frame;
* ``static/``: the stylesheet and the one small script (copy button, print, auto-submit).

No inline script or style (``Content-Security-Policy: script-src 'self'; style-src 'self'``), no CDN,
no build step. Registered as its own built-in plugin (``plugins.disable: [dashboard]`` removes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from nexgate_proxy import hookimpl
from nexgate_proxy.config import Config, ConfigSection

from . import pages_account as account
from . import pages_me as me
from . import pages_operator as operator
from . import pages_org as org
from .common import DASHBOARD, endpoint, secure_headers
from .settings import DASHBOARD_SECTION

STATIC = Path(__file__).parent / "static"
_TYPES = {".css": "text/css", ".js": "text/javascript"}

GET_PAGES = (
    ("/", me.home), ("/keys", me.keys), ("/keys/{key_id}/revoke", me.revoke_confirm),
    ("/privacy", me.privacy_page), ("/privacy/export", me.privacy_export),
    ("/overview", account.overview), ("/usage", account.usage), ("/usage/export", account.usage_export),
    ("/credits", account.credits), ("/statements", account.statements), ("/statements/{month}", account.statement),
    ("/invoice", account.invoice),
    ("/orgs", org.orgs), ("/orgs/{org_id}", org.org),
    ("/operator", operator.operator), ("/operator/search", operator.search),
    ("/operator/accounts/{account_id}", operator.account),
)
POST_ACTIONS = (
    ("/logout", me.logout), ("/keys", me.create_key), ("/keys/{key_id}/revoke", me.revoke),
    ("/privacy/delete", me.privacy_delete),
    ("/orgs/{org_id}/members", org.add_member), ("/orgs/{org_id}/members/{user_id}/role", org.set_role),
    ("/orgs/{org_id}/members/{user_id}/remove", org.remove),
    ("/operator/grant", operator.grant), ("/operator/orgs/{org_id}/limits", operator.org_limits),
)


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [DASHBOARD_SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    settings = config.section(DASHBOARD_SECTION)
    if not settings.enabled:
        return
    app[DASHBOARD] = settings
    prefix = settings.path
    router = app.router
    async def to_root(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(prefix + "/")

    router.add_get(prefix, to_root)
    router.add_route("GET", prefix + "/login", me.login)
    router.add_route("POST", prefix + "/login", me.login_post)
    router.add_route("GET", prefix + "/static/{name}", _static)
    for path, handler in GET_PAGES:
        router.add_route("GET", prefix + path, endpoint(handler, "GET"))
    for path, handler in POST_ACTIONS:
        router.add_route("POST", prefix + path, endpoint(handler, "POST"))


_FILES = {p.name: (p.read_bytes(), _TYPES[p.suffix]) for p in STATIC.iterdir() if p.suffix in _TYPES}


async def _static(request: web.Request) -> web.StreamResponse:
    found = _FILES.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    body, kind = found
    response = secure_headers(web.Response(body=body, content_type=kind, charset="utf-8"))
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response
