"""The operator's pages (superadmin only): health, models and prices, users and organizations,
credit grants, key revocation (``/keys/{id}/revoke``) and per-organization limits.

Grants go through ``nexgate_plugins.credits.grants`` as ``nexgate credits grant`` does; the store's
change feed brings it to every gateway's cached balance. Limits go through the admin API's own
``parse_org_limits`` and ``set_org_limits``.
"""

from __future__ import annotations

from aiohttp import web

from nexgate_proxy import GatewayError
from nexgate_proxy.accounts import set_org_limits
from nexgate_proxy.appkeys import CHAIN, CONFIG, FEED, STORE
from nexgate_proxy.services import readiness
from nexgate_plugins.credits import CREDITS, grants
from nexgate_plugins.credits.grants import GrantError, check_reason, parse_usd
from nexgate_plugins.credits.statements import find_account

from .. import api
from .common import Form, base, redirect, text_field
from .markup import Safe, html, join
from .pages_me import KEY_HEADERS, key_rows
from .session import Session
from .views import csrf_field, day, page, table, url, usd

SEARCH_LIMIT = 5000


def _operator(session: Session) -> None:
    api._require_superadmin(session.caller)


async def operator(request: web.Request, session: Session) -> web.Response:
    _operator(session)
    app = request.app
    checks = await readiness(app) + await app[CHAIN].ready(app)
    outbox = _outbox(app)
    health = table(("Check", "State"), [(name, "ready" if ok else "NOT READY") for name, ok in checks] +
                   ([("usage outbox backlog", f"{outbox:,} rows waiting")] if outbox is not None else []), "")
    models = []
    for alias, route in app[CONFIG].models.items():
        price = route.price
        models.append((alias, ", ".join(f"{t.provider}/{t.model}" for t in route.targets),
                       "free" if route.free else (f"${price.input} / ${price.output}" if price else "unpriced"),
                       ", ".join(route.fallbacks) or "–"))
    search = html('<form method="get" action="{b}/operator/search" class="filters">'
                  '<label>Find a user or organization <input name="q" placeholder="id, email or name" required>'
                  '</label><button type="submit">Search</button></form>', b=base(request))
    body = html('{s}<h2>Health</h2>{h}<h2>Models and prices</h2><p class="muted">USD per million input / output '
                'tokens, from the routing table.</p>{m}', s=search, h=health,
                m=table(("Model", "Targets", "Price (in / out)", "Fallbacks"), models, "No models configured."))
    return page(base(request), session, "Operator", body, active="operator")


def _outbox(app: web.Application) -> int | None:
    try:
        from nexgate_plugins.usage_log import OUTBOX
    except ImportError:
        return None
    outbox = app.get(OUTBOX)
    return outbox.pending if outbox is not None else None


async def search(request: web.Request, session: Session) -> web.Response:
    _operator(session)
    q = (request.query.get("q") or "").strip().lower()
    store = request.app[STORE]
    b = base(request)
    users = [u for u in await store.list_users(SEARCH_LIMIT, include_deleted=True)
             if q and any(q in (v or "").lower() for v in (u.id, u.email, u.name))][:100]
    orgs = [o for o in await store.list_orgs(SEARCH_LIMIT) if q and (q in o.id.lower() or q in o.name.lower())][:100]
    body = html('<h2>Users</h2>{u}<h2>Organizations</h2>{o}',
                u=table(("User", "Email", "Name", "Created", "State"), [
                    (html('<a href="{b}/operator/accounts/{i}">{i}</a>', b=b, i=u.id), u.email or "–", u.name or "–",
                     day(u.created_at), "deleted" if u.deleted_at else "active") for u in users], "No user matches."),
                o=table(("Organization", "Name", "Created"), [
                    (html('<a href="{b}/operator/accounts/{i}">{i}</a>', b=b, i=o.id), o.name, day(o.created_at))
                    for o in orgs], "No organization matches."))
    return page(b, session, f"Search: {q}", body, active="operator")


async def account(request: web.Request, session: Session) -> web.Response:
    _operator(session)
    store = request.app[STORE]
    account_id = api._path_id(request, "account_id", "account")
    found = await find_account(store, account_id)
    if found is None:
        raise api.not_found("account")
    b = base(request)
    balance = await store.get_balance(found.id)
    scope = {"user_id": found.id} if found.type == "user" else {"org_id": found.id}
    keys = await store.list_api_keys(**scope, include_revoked=True)
    links = join(html('<a href="{u}">{n}</a> ', u=url(f"{b}/{p}", account=found.id), n=n)
                 for p, n in (("overview", "Overview"), ("usage", "Usage"), ("credits", "Credits"),
                              ("statements", "Statements")))
    grant = html('<form method="post" action="{b}/operator/grant" class="filters">{csrf}'
                 '<input type="hidden" name="account" value="{a}">'
                 '<label>USD <input name="usd" inputmode="decimal" required placeholder="10.00"></label>'
                 '<label>Reason <input name="reason" required maxlength="500"></label>'
                 '<button type="submit">Grant credits</button></form>', b=b, csrf=csrf_field(session), a=found.id)
    extra = Safe("")
    if found.type == "organization":
        org = await store.get_org(found.id)
        limits = dict(org.limits or {}) if org else {}
        fields = join(html('<label>{n} <input type="number" min="0" name="{n}" value="{v}" placeholder="YAML"></label>',
                           n=n, v=limits.get(n, "")) for n in api.ORG_LIMIT_NAMES)
        extra = html('<h2>Limits</h2><p class="muted">Overrides of the YAML limits for this organization; empty = the '
                     'YAML applies, 0 = no limit.</p><form method="post" action="{b}/operator/orgs/{o}/limits" '
                     'class="filters">{csrf}{f}<button type="submit">Save limits</button></form>'
                     '<p><a href="{b}/orgs/{o}">Members and organization keys</a></p>',
                     b=b, o=found.id, csrf=csrf_field(session), f=fields)
    body = html('<p class="muted">{t} · {n}</p><p>{links}</p><section class="cards"><div class="card"><h2>Balance'
                '</h2><p class="big">{bal}</p></div></section><h2>Grant credits</h2>{grant}{extra}<h2>Keys</h2>{keys}',
                t=found.type, n=found.name or "", links=links, bal=usd(balance), grant=grant, extra=extra,
                keys=table(KEY_HEADERS, key_rows(request, keys), "No keys."))
    return page(b, session, found.id, body, active="operator")


async def grant(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    """The operator's grant: the one implementation the CLI and ``POST /admin/v1/credits/grants`` use."""
    _operator(session)
    store = request.app[STORE]
    account_id = text_field(form, "account") or ""
    found = await find_account(store, account_id) if api.is_id(account_id) else None
    if found is None:
        raise api.not_found("account")
    try:
        amount = parse_usd(text_field(form, "usd") or "")
        reason = check_reason(text_field(form, "reason") or "")
        credits = request.app.get(CREDITS)
        done = await grants.grant(store, credits.state if credits else None, found.id, amount, reason, None)
    except GrantError as exc:
        raise api.bad("usd" if exc.field == "amount" else exc.field, f"{exc.message}.") from None
    if done.applied:
        await request.app[FEED].deliver_now()  # this instance's cached balance at once
    raise redirect(f"{base(request)}/operator/accounts/{found.id}")


async def org_limits(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    _operator(session)
    organization, _ = await api._org_access(request, session.caller, api._path_id(request, "org_id", "organization"))
    raw: dict[str, int] = {}
    for name in api.ORG_LIMIT_NAMES:
        value = text_field(form, name)
        if value is None:
            continue
        if not value.isdigit():
            raise GatewayError(400, f"'{name}' must be a whole number.", code="invalid_request", param=name)
        raw[name] = int(value)
    limits = api.parse_org_limits(raw)
    await set_org_limits(request.app[STORE], request.app[FEED], organization.id, limits)
    raise redirect(f"{base(request)}/operator/accounts/{organization.id}")
