"""The caller's own things: sign-in and sign-out, API keys (create, shown once; revoke) and privacy.

Every action runs the admin API's own function: ``api.create_key_for`` (ownership, limits that only
tighten, expiry and model checks), ``api._key_access`` (others' personal keys are 404), the privacy
module's export and deletion.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from nexgate_proxy import GatewayError
from nexgate_proxy.accounts import revoke_api_key
from nexgate_proxy.appkeys import FEED, STORE
from nexgate_proxy.store import ApiKeyRow

from .. import api, privacy
from .common import DASHBOARD, Form, base, redirect, secure_headers, text_field
from .markup import Safe, html
from .session import CLERK_COOKIE, LOGIN_CSRF_COOKIE, Session, check_origin, clear, issue, secure
from .views import csrf_field, day, error_page, page, post_button, table, when

DELETE_PHRASE = "delete my account"


# ------------------------------------------------------------------ sign-in


def _next(request: web.Request, value: str | None) -> str:
    target = value or ""
    root = base(request)
    if not target.startswith(root + "/") or target.startswith("//") or "\\" in target:
        return f"{root}/"
    return target


async def login(request: web.Request) -> web.StreamResponse:
    settings = request.app[DASHBOARD]
    target = _next(request, request.query.get("next"))
    clerk_token = request.cookies.get(CLERK_COOKIE)
    if clerk_token:  # Clerk's own cookie on this domain: verified exactly as the admin API verifies it
        try:
            caller = await api.authenticate(request, clerk_token)
        except GatewayError:
            caller = None
        if caller is not None:
            response = web.HTTPSeeOther(target)
            issue(request, settings, caller, response)
            raise response
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_hex(16)
    clerk = html('<p><a class="button" href="{u}">Sign in with Clerk</a></p><p class="muted">or</p>',
                 u=settings.clerk_sign_in_url) if settings.clerk_sign_in_url else Safe("")
    body = html(
        '<section class="signin">{clerk}<form method="post" action="{b}/login">'
        '<input type="hidden" name="csrf" value="{t}"><input type="hidden" name="next" value="{n}">'
        '<label>Admin token or session token<input type="password" name="token" autocomplete="current-password" '
        'required></label><button type="submit">Sign in</button></form>'
        '<p class="muted">Operators sign in with the bootstrap admin token (<code>auth.admin_token_sha256</code>); '
        'users with their Clerk session.</p></section>',
        clerk=clerk, b=base(request), t=token, n=target)
    response = page(base(request), None, "Sign in", body)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, path=settings.path, httponly=True, samesite="Strict",
                        secure=secure(request, settings), max_age=3600)
    return secure_headers(response)


async def login_post(request: web.Request) -> web.StreamResponse:
    settings = request.app[DASHBOARD]
    form = await request.post()
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    given = form.get("csrf")
    try:
        check_origin(request)
        if not expected or not isinstance(given, str) or not hmac.compare_digest(given, expected):
            raise GatewayError(403, "The sign-in form's security token is missing or stale: reload and retry.",
                               code="csrf_failed")
        token = form.get("token")
        caller = await api.authenticate(request, token if isinstance(token, str) else "")
    except GatewayError as exc:
        return secure_headers(error_page(base(request), None, exc.status, exc.message))
    next_value = form.get("next")
    response = web.HTTPSeeOther(_next(request, next_value if isinstance(next_value, str) else None))
    issue(request, settings, caller, response)
    response.del_cookie(LOGIN_CSRF_COOKIE, path=settings.path)
    raise response


async def logout(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    response = web.HTTPSeeOther(f"{base(request)}/login")
    clear(request, request.app[DASHBOARD], response)
    raise response


async def home(request: web.Request, session: Session) -> web.StreamResponse:
    raise redirect(f"{base(request)}/{'operator' if session.caller.superadmin else 'overview'}")


# ------------------------------------------------------------------ keys


def key_rows(request: web.Request, rows: list[ApiKeyRow]) -> list[tuple[Any, ...]]:
    now = datetime.now(UTC)
    out = []
    for k in rows:
        state = "revoked" if k.revoked_at else "expired" if not k.is_usable(now) else "active"
        action: Any = "" if state != "active" else html('<a href="{b}/keys/{i}/revoke">Revoke…</a>',
                                                         b=base(request), i=k.id)
        out.append((html("<code>{p}</code>", p=k.prefix), k.name, day(k.created_at), when(k.last_used_at),
                    day(k.expires_at) if k.expires_at else "never",
                    ", ".join(k.allowed_models) if k.allowed_models else "all",
                    ", ".join(f"{n}={v}" for n, v in (k.limits or {}).items()) or "operator's", state, action))
    return out


KEY_HEADERS = ("Prefix", "Name", "Created", "Last used", "Expires", "Models", "Limits", "State", "")


def create_key_form(request: web.Request, session: Session, org_id: str | None = None) -> Safe:
    org = html('<input type="hidden" name="org_id" value="{o}">', o=org_id) if org_id else Safe("")
    return html(
        '<form method="post" action="{b}/keys" class="stack">{csrf}{org}'
        '<label>Name <input name="name" required maxlength="200" placeholder="e.g. production server"></label>'
        '<label>Expires (optional) <input type="date" name="expires"></label>'
        '<label>Allowed models (optional, comma-separated) <input name="models" placeholder="all models"></label>'
        '<label>Requests per minute (optional, only lower than the operator\'s) <input type="number" name="rpm" '
        'min="1"></label><button type="submit">Create key</button></form>',
        b=base(request), csrf=csrf_field(session), org=org)


async def keys(request: web.Request, session: Session) -> web.Response:
    caller = session.caller
    if caller.user is None:
        raise redirect(f"{base(request)}/operator")
    show_all = request.query.get("revoked") == "1"
    rows = await request.app[STORE].list_api_keys(user_id=caller.user.id, include_revoked=show_all)
    toggle = html('<p><a href="{b}/keys{q}">{t}</a></p>', b=base(request), q="" if show_all else "?revoked=1",
                  t="Hide revoked keys" if show_all else "Show revoked keys")
    body = html('<h2>Your personal keys</h2>{t}{g}<h2>Create a key</h2>{f}', t=toggle,
                g=table(KEY_HEADERS, key_rows(request, rows), "No keys yet: create one below, then call "
                        "the gateway with any OpenAI SDK."), f=create_key_form(request, session))
    return page(base(request), session, "API keys", body, active="keys")


async def create_key(request: web.Request, session: Session, form: Form) -> web.Response:
    data: dict[str, Any] = {"name": form.get("name") if isinstance(form.get("name"), str) else None}
    org_id = text_field(form, "org_id")
    if org_id:
        data["org_id"] = org_id
    expires = text_field(form, "expires")
    if expires:
        data["expires_at"] = expires + "T00:00:00+00:00" if len(expires) == 10 else expires
    models = text_field(form, "models")
    if models:
        data["allowed_models"] = [m.strip() for m in models.split(",") if m.strip()]
    rpm = text_field(form, "rpm")
    if rpm:
        if not rpm.isdigit():
            raise api.bad("rpm", "Requests per minute must be a whole number.")
        data["limits"] = {"rpm": int(rpm)}
    created = await api.create_key_for(request, session.caller, data)  # the admin API's own rules
    back = f"{base(request)}/orgs/{org_id}" if org_id else f"{base(request)}/keys"
    body = html(
        '<section class="notice success" role="status"><h2>Key “{name}” created</h2>'
        '<p><strong>Copy it now: you will not see it again.</strong> NexGate keeps only a hash of it.</p>'
        '<div class="secret"><code id="new-key">{key}</code>'
        '<button type="button" data-copy="new-key">Copy</button></div>'
        '<p>Use it as <code>Authorization: Bearer …</code> with base URL <code>{origin}/v1</code>.</p>'
        '<p><a href="{back}">Done</a></p></section>',
        name=created.row.name, key=created.plaintext, origin=f"{request.scheme}://{request.host}", back=back)
    response = page(base(request), session, "New API key", body, active="keys", status=201)
    response.headers["Cache-Control"] = "no-store"
    return response


async def revoke_confirm(request: web.Request, session: Session) -> web.Response:
    row = await api._key_access(request, session.caller, api._path_id(request, "key_id", "API key"))
    body = html('<section class="notice warn"><p>Revoke key <code>{p}</code> “{n}”? Every request with it is '
                'refused within a second, on every gateway. This cannot be undone.</p>{form}'
                '<p><a href="{back}">Cancel</a></p></section>',
                p=row.prefix, n=row.name, form=post_button(f"{base(request)}/keys/{row.id}/revoke", "Revoke key",
                                                           session, danger=True),
                back=_key_home(request, session, row))
    return page(base(request), session, "Revoke key", body, active="keys")


def _key_home(request: web.Request, session: Session, row: ApiKeyRow) -> str:
    if session.caller.superadmin:
        return f"{base(request)}/operator/accounts/{row.owner_id}"
    return f"{base(request)}/orgs/{row.org_id}" if row.org_id else f"{base(request)}/keys"


async def revoke(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    row = await api._key_access(request, session.caller, api._path_id(request, "key_id", "API key"))
    await revoke_api_key(request.app[STORE], request.app[FEED], row.id)
    raise redirect(_key_home(request, session, row))


# ------------------------------------------------------------------ privacy


def _me(session: Session) -> str:
    if session.caller.user is None:
        raise GatewayError(404, "The operator has no personal account: this page is for users.", code="not_found")
    return session.caller.user.id


async def privacy_page(request: web.Request, session: Session) -> web.Response:
    _me(session)
    body = html(
        '<h2>Export my data</h2><p>Your profile, balance, personal keys (metadata only, never the secret), '
        'memberships, every usage record and ledger entry of your personal account.</p>'
        '<p><a class="button" href="{b}/privacy/export?format=json" download>Download JSON</a> '
        '<a class="button secondary" href="{b}/privacy/export?format=csv" download>Download CSV (zip)</a></p>'
        '<h2>Delete my account</h2>'
        '<p>Your email, name and sign-in identity are removed; your personal keys and the organization keys you '
        'created are revoked at once; you leave every organization; the client IPs of your requests are cleared.</p>'
        '<p><strong>What is kept:</strong> some data (e.g. financial records) may be retained for legal compliance. '
        'Transaction records are retained for a minimum of 5 years for financial and audit purposes, as required by '
        'applicable law; your usage records and ledger stay under an anonymous id. If you are the last owner of an '
        'organization, give it another owner first.</p>'
        '<form method="post" action="{b}/privacy/delete" class="stack danger-zone">{csrf}'
        '<label>Type <strong>{phrase}</strong> to confirm <input name="confirm" autocomplete="off" required></label>'
        '<button type="submit" class="danger">Delete my account</button></form>',
        b=base(request), csrf=csrf_field(session), phrase=DELETE_PHRASE)
    return page(base(request), session, "Privacy", body, active="privacy")


async def privacy_export(request: web.Request, session: Session) -> web.Response:
    user_id = _me(session)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise api.bad("format", "'format' must be json or csv.")
    document = await privacy.build_export(request.app[STORE], user_id)
    if fmt == "json":
        return web.Response(body=privacy.export_json_bytes(document), content_type="application/json", headers={
            "Content-Disposition": f'attachment; filename="nexgate-export-{user_id}.json"'})
    return web.Response(body=privacy.export_csv_zip(document), content_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="nexgate-export-{user_id}.zip"'})


async def privacy_delete(request: web.Request, session: Session, form: Form) -> web.Response:
    user_id = _me(session)
    if (text_field(form, "confirm") or "").lower() != DELETE_PHRASE:
        raise api.bad("confirm", f"Type “{DELETE_PHRASE}” to confirm: nothing was deleted.")
    result = await privacy.delete_account(request.app[STORE], request.app[FEED], user_id)
    body = html('<section class="notice success" role="status"><p>Your account was deleted: {k} keys revoked, '
                '{o} organizations left. Financial records are kept under an anonymous id.</p></section>',
                k=len(result.revoked_key_ids), o=len(result.left_org_ids))
    response = page(base(request), None, "Account deleted", body)
    clear(request, request.app[DASHBOARD], response)
    return response
