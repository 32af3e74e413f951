"""Organizations: members and roles, org keys, the org's balance and usage per key and per model.

The admin API's rules, through its own functions: ``_org_access`` (404 for outsiders),
``_require_admin`` (members, keys, money: admins and owners), ``_require_owner`` (adding, removing
and re-roling members), ``remove_member`` (also revokes the keys the member created). A member's
personal keys, balance and usage never appear here: only the organization's own account.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from aiohttp import web

from nexgate_proxy.appkeys import STORE
from nexgate_proxy.store import ROLES

from .. import api
from .common import Form, base, redirect, text_field
from .markup import Safe, html, join
from .pages_me import KEY_HEADERS, create_key_form, key_rows
from .session import Session
from .views import csrf_field, day, page, post_button, table, url, usd


async def orgs(request: web.Request, session: Session) -> web.Response:
    caller = session.caller
    if caller.user is None:
        raise redirect(f"{base(request)}/operator")
    mine = await request.app[STORE].list_orgs_for_user(caller.user.id)
    rows = [(html('<a href="{b}/orgs/{i}">{n}</a>', b=base(request), i=o.id, n=o.name), role, day(o.created_at))
            for o, role in mine]
    body = table(("Organization", "Your role", "Created"), rows,
                 "You are not in an organization. An owner can add you by your user id: " + caller.user.id)
    return page(base(request), session, "Organizations", body, active="orgs")


async def org(request: web.Request, session: Session) -> web.Response:
    caller = session.caller
    organization, role = await api._org_access(request, caller, api._path_id(request, "org_id", "organization"))
    b = base(request)
    if not caller.superadmin and role not in api.ADMIN_ROLES:
        body = html('<p>You are a <strong>member</strong> of {n}. Its keys, members and usage are shown to its '
                    'admins and owners.</p>{leave}', n=organization.name,
                    leave=post_button(f"{b}/orgs/{organization.id}/members/{caller.user.id}/remove",
                                      "Leave organization", session, danger=True) if caller.user else Safe(""))
        return page(b, session, organization.name, body, active="orgs")
    api._require_admin(caller, role)
    store = request.app[STORE]
    owner = caller.superadmin or role == "owner"
    members = await store.list_members(organization.id)
    users = await asyncio.gather(*[store.get_user(m.user_id) for m in members])
    member_rows = []
    for m, u in zip(members, users):
        actions = Safe("")
        if owner:
            options = join(html('<option{s}>{r}</option>', r=r, s=Safe(" selected") if r == m.role else Safe(""))
                           for r in ROLES)
            actions = html('<form method="post" action="{b}/orgs/{o}/members/{u}/role" class="inline">{csrf}'
                           '<select name="role" aria-label="Role of {who}">{opts}</select>'
                           '<button type="submit" class="secondary">Change</button></form> {remove}',
                           b=b, o=organization.id, u=m.user_id, csrf=csrf_field(session), opts=options,
                           who=(u.email if u else None) or m.user_id,
                           remove=post_button(f"{b}/orgs/{organization.id}/members/{m.user_id}/remove", "Remove",
                                              session, danger=True))
        member_rows.append(((u.email or u.name if u else None) or "(deleted)", m.user_id, m.role, day(m.created_at),
                            actions))
    add = Safe("")
    if owner:
        add = html('<form method="post" action="{b}/orgs/{o}/members" class="filters">{csrf}'
                   '<label>User id <input name="user_id" required placeholder="usr_…"></label>'
                   '<label>Role <select name="role">{opts}</select></label><button type="submit">Add member</button>'
                   '</form>', b=b, o=organization.id, csrf=csrf_field(session),
                   opts=join(html("<option>{r}</option>", r=r) for r in ("member", "admin", "owner")))
    org_keys = await store.list_api_keys(org_id=organization.id, include_revoked=False)
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    balance = await store.get_balance(organization.id)
    per_key = await store.usage_totals(account_id=organization.id, since=month_start, group_by="key")
    per_model = await store.usage_totals(account_id=organization.id, since=month_start, group_by="model")
    prefixes = {k.id: f"{k.prefix} {k.name}" for k in await store.list_api_keys(org_id=organization.id,
                                                                                  include_revoked=True)}

    def totals(rows: list, label) -> Safe:  # type: ignore[no-untyped-def, type-arg]
        return table(("", "Requests", "Tokens", "Spend"),
                     [(label(t.group), f"{t.requests:,}", f"{t.prompt_tokens + t.completion_tokens:,}",
                       usd(t.cost_pico)) for t in rows], "No usage this month.", numeric=(1, 2, 3))

    body = html(
        '<section class="cards"><div class="card"><h2>Organization balance</h2><p class="big">{bal}</p>'
        '<a href="{credits}">Credits and buying</a> · <a href="{usage}">Usage log</a> · '
        '<a href="{st}">Statements</a></div><div class="card"><h2>Your role</h2><p class="big">{role}</p></div></section>'
        '<h2>Members</h2>{members}{add}<h2>Organization keys</h2>{keys}<h3>Create an organization key</h3>{form}'
        '<h2>Usage this month per key</h2>{per_key}<h2>Usage this month per model</h2>{per_model}',
        bal=usd(balance), credits=url(f"{b}/credits", account=organization.id),
        usage=url(f"{b}/usage", account=organization.id), st=url(f"{b}/statements", account=organization.id),
        role=role or "operator", members=table(("Member", "User id", "Role", "Since", ""), member_rows, "No members."),
        add=add, keys=table(KEY_HEADERS, key_rows(request, org_keys), "No organization keys yet."),
        form=create_key_form(request, session, organization.id),
        per_key=totals(per_key, lambda g: prefixes.get(g, g or "(none)")),
        per_model=totals(per_model, lambda g: g or "(none)"))
    return page(b, session, organization.name, body, active="orgs")


async def add_member(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    organization, role = await api._org_access(request, session.caller, api._path_id(request, "org_id", "organization"))
    api._require_owner(session.caller, role)
    data = {"user_id": text_field(form, "user_id"), "role": text_field(form, "role") or "member"}
    user_id = api._body_id(data, "user_id", required=True)
    new_role = api._role(data, default="member")
    store = request.app[STORE]
    user = await api._usable_user(store, user_id, "user_id")
    await store.add_member(organization.id, user.id, new_role)
    raise redirect(f"{base(request)}/orgs/{organization.id}")


async def set_role(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    organization, role = await api._org_access(request, session.caller, api._path_id(request, "org_id", "organization"))
    api._require_owner(session.caller, role)
    user_id = api._path_id(request, "user_id", "member")
    await request.app[STORE].set_member_role(organization.id, user_id, api._role({"role": text_field(form, "role")}))
    raise redirect(f"{base(request)}/orgs/{organization.id}")


async def remove(request: web.Request, session: Session, form: Form) -> web.StreamResponse:
    caller = session.caller
    user_id = api._path_id(request, "user_id", "member")
    organization, _ = await api.remove_member_as(request, caller, api._path_id(request, "org_id", "organization"),
                                                 user_id)
    leaving = caller.user is not None and caller.user.id == user_id
    raise redirect(f"{base(request)}/orgs" if leaving else f"{base(request)}/orgs/{organization.id}")
