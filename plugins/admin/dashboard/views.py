"""The page frame (navigation, account switcher, sign-out form) and small formatting helpers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Iterable, Sequence
from urllib.parse import urlencode

from aiohttp import web

from nexgate_proxy.money import format_usd

from .markup import Safe, escape, html, join
from .session import Session

NAV = (("overview", "Overview"), ("keys", "API keys"), ("usage", "Usage"), ("credits", "Credits"),
       ("statements", "Statements"), ("orgs", "Organization"), ("privacy", "Privacy"))


def usd(pico: int | None) -> str:
    """Dollars to the cent for reading (the exact amount is in the JSON views); small costs keep 6 decimals."""
    if pico is None:
        return "–"
    text = format_usd(abs(pico))
    whole, _, fraction = text.partition(".")
    digits = 2 if abs(pico) >= 10**10 or not fraction.strip("0") else 6
    fraction = (fraction + "000000")[:digits]
    return f"{'-' if pico < 0 else ''}${int(whole):,}.{fraction}"


def when(moment: datetime | None) -> str:
    return "–" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def day(moment: datetime | None) -> str:
    return "–" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d")


def url(base: str, **query: Any) -> str:
    clean = {k: v for k, v in query.items() if v not in (None, "")}
    return f"{base}?{urlencode(clean)}" if clean else base


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str, numeric: Sequence[int] = ()) -> Safe:
    head = join(html('<th scope="col"{c}>{h}</th>', h=h, c=Safe(' class="num"') if i in numeric else Safe(""))
                for i, h in enumerate(headers))
    body = [join(html("<td{c}>{v}</td>", v=v, c=Safe(' class="num"') if i in numeric else Safe(""))
                 for i, v in enumerate(row)) for row in rows]
    if not body:
        return html('<p class="empty">{e}</p>', e=empty)
    return html('<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>',
                head=head, body=join(html("<tr>{r}</tr>", r=r) for r in body))


def csrf_field(session: Session) -> Safe:
    return html('<input type="hidden" name="csrf" value="{t}">', t=session.csrf)


def post_button(action: str, label: str, session: Session, *, fields: dict[str, str] | None = None,
                danger: bool = False) -> Safe:
    hidden = join(html('<input type="hidden" name="{n}" value="{v}">', n=n, v=v) for n, v in (fields or {}).items())
    return html('<form method="post" action="{a}" class="inline">{csrf}{hidden}'
                '<button type="submit" class="{cls}">{label}</button></form>',
                a=action, csrf=csrf_field(session), hidden=hidden, cls="danger" if danger else "secondary", label=label)


def page(base: str, session: Session | None, title: str, body: Safe, *, active: str = "",
         accounts: Sequence[tuple[str, str]] = (), account: str | None = None, status: int = 200) -> web.Response:
    """A whole page: the navigation (for a signed-in caller), ``body`` and the assets (same origin only)."""
    nav = Safe("")
    if session is not None:
        caller = session.caller
        items = [] if caller.superadmin else list(NAV)
        if caller.superadmin:
            items.append(("operator", "Operator"))
        links = join(html('<a href="{b}/{p}"{cur}>{label}</a>', b=base, p=p, label=label,
                          cur=Safe(' aria-current="page"') if p == active else Safe("")) for p, label in items)
        who = "Operator" if caller.superadmin else (caller.user.email or caller.user.name or caller.user.id
                                                    if caller.user else "")
        switch = Safe("")
        if len(accounts) > 1 and active in ("overview", "usage", "credits", "statements"):
            options = join(html('<option value="{v}"{sel}>{n}</option>', v=v, n=n,
                                sel=Safe(" selected") if v == account else Safe("")) for v, n in accounts)
            switch = html('<form method="get" class="switch" action="{b}/{a}"><label>Account '
                          '<select name="account" data-autosubmit>{o}</select></label>'
                          '<noscript><button type="submit">Show</button></noscript></form>', b=base, a=active, o=options)
        signout = html('<form method="post" action="{b}/logout" class="inline">{csrf}'
                       '<button type="submit" class="link">Sign out</button></form>', b=base, csrf=csrf_field(session))
        nav = html('<header class="top"><a class="brand" href="{b}/">NexGate</a><nav aria-label="Main">{links}</nav>'
                   '<div class="who"><span>{who}</span>{signout}</div></header>{switch}',
                   b=base, links=links, who=who, signout=signout, switch=switch)
    document = html(
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<title>{title} · NexGate</title><link rel="stylesheet" href="{b}/static/dashboard.css">'
        '<script src="{b}/static/dashboard.js" defer></script></head>'
        '<body>{nav}<main id="main"><h1>{title}</h1>{body}</main></body></html>',
        title=title, b=base, nav=nav, body=body)
    return web.Response(text=document, content_type="text/html", charset="utf-8", status=status)


def error_page(base: str, session: Session | None, status: int, message: str) -> web.Response:
    titles = {400: "That did not work", 401: "Sign in needed", 402: "Out of credits", 403: "Not allowed",
              404: "Not found", 409: "Not possible right now", 503: "Unavailable"}
    body = html('<p class="notice error" role="alert">{m}</p><p><a href="{b}/">Back to the dashboard</a></p>',
                m=message, b=base)
    return page(base, session, titles.get(status, "Something went wrong"), body, status=status)


__all__ = ["csrf_field", "day", "error_page", "escape", "page", "post_button", "table", "url", "usd", "when"]
