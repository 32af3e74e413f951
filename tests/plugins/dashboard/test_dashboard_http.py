"""The dashboard over plain HTTP (no browser): config, bearer access, keyset pages, disabling it."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from nexgate_proxy.appkeys import STORE
from nexgate_proxy.config import ConfigError, parse_config
from nexgate_proxy.plugins import resolve_config
from nexgate_proxy.store import UsageRecord
from nexgate_proxy.testing import FakeUpstream, gateway_config

TOKEN = "ngadmin-dashboard-http-test-token-00112233445566778899"
AUTH = {"bcrypt_rounds": 4, "admin_token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def _row(i: int, account: str, ts: datetime) -> UsageRecord:
    return UsageRecord(request_id=f"req-{i:04d}", ts=ts, endpoint="chat.completions", model="m", provider="p",
                       upstream_model="m", account_id=account, org_id=None, key_id=None, key_prefix=None,
                       prompt_tokens=1, completion_tokens=1, cached_tokens=0, usage_estimated=False,
                       estimated_cost_pico=None, actual_cost_pico=None, latency_ms=5,
                       status=200 if i % 10 else 500, error_code=None, stream=False, client_ip=None, attempts=1)


async def test_keyset_pages_list_every_row_once_even_when_times_tie(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream, auth=AUTH))
    store = gw.app[STORE]
    tied = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    # 130 rows on one microsecond and 70 on others: pages of 50 must still cut between equal times
    await store.record_usage([_row(i, gw.user_id, tied if i < 130 else tied - timedelta(seconds=i))
                              for i in range(200)])
    seen: list[str] = []
    path = f"/dashboard/usage?account={gw.user_id}"
    async with aiohttp.ClientSession(headers=BEARER) as http:
        while path:
            async with http.get(gw.url + path) as response:
                assert response.status == 200
                assert response.headers["Cache-Control"] == "no-store"
                page = await response.text()
            seen += re.findall(r"<tr><td>(\d{4}-\d\d-\d\d \d\d:\d\d UTC)</td>", page)
            more = re.search(r'href="([^"]+)" rel="next"', page)
            path = more.group(1).replace("&amp;", "&") if more else ""
        assert len(seen) == 200
        async with http.get(gw.url + f"/dashboard/usage/export?format=json&account={gw.user_id}") as response:
            exported = (await response.json())["data"]
        assert sorted(r["request_id"] for r in exported) == [f"req-{i:04d}" for i in range(200)]
        async with http.get(gw.url + f"/dashboard/usage/export?format=json&status=error&account={gw.user_id}") as r:
            assert {x["status"] for x in (await r.json())["data"]} == {500}
        # a bearer request needs no CSRF token: a browser never sends that header on its own
        async with http.post(gw.url + "/dashboard/operator/grant",
                             data={"account": gw.user_id, "usd": "2.5", "reason": "test"}, allow_redirects=False) as r:
            assert r.status == 303
    assert await store.get_balance(gw.user_id) == 2_500_000_000_000


async def test_the_dashboard_can_be_moved_or_turned_off(upstream: FakeUpstream, start_gateway) -> None:
    moved = await start_gateway(gateway_config(upstream, auth=AUTH, dashboard={"path": "/console"}))
    off = await start_gateway(gateway_config(upstream, auth=AUTH, dashboard={"enabled": False}))
    async with aiohttp.ClientSession() as http:
        async with http.get(moved.url + "/console/login") as response:
            assert response.status == 200 and "Sign in" in await response.text()
            assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        async with http.get(moved.url + "/console/static/dashboard.css") as response:
            assert response.status == 200 and response.content_type == "text/css"
        async with http.get(moved.url + "/dashboard/login") as response:
            assert response.status == 404
        async with http.get(off.url + "/dashboard/login") as response:
            assert response.status == 404


@pytest.mark.parametrize("section, problem", [
    ({"path": "dashboard/"}, "dashboard.path: must be a path"),
    ({"session_secret": "short"}, "dashboard.session_secret: must be at least 32 characters"),
    ({"checkout": {"prod_1": {"url": "ftp://x"}}}, "dashboard.checkout.prod_1.url: required"),
    ({"cookie_samesite": "None"}, "dashboard.cookie_samesite: must be Strict or Lax"),
    ({"business": {"invoice_prefix": "bad prefix!"}}, "dashboard.business.invoice_prefix: must be up to 20"),
    ({"enabled": True, "plugins": {"disable": ["admin"]}}, "dashboard.enabled: the dashboard runs on the admin"),
])
def test_config_mistakes_are_named(section: dict, problem: str) -> None:
    plugins = section.pop("plugins", {})
    raw = {"providers": {"e": {"type": "echo"}}, "models": {"m": {"route": [{"provider": "e"}], "free": True}},
           "dashboard": section, "plugins": plugins}
    with pytest.raises(ConfigError) as caught:
        resolve_config(parse_config(raw, "test"))
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


async def test_overview_figures_match_the_store_totals(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream, auth=AUTH))
    store = gw.app[STORE]
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    models = ("m-one", "m-two", None)
    # Rows today, earlier this month, last month and before the 90 days shown, over three models.
    rows = [_row(i, gw.user_id, now - timedelta(hours=i * 7)) for i in range(400)]
    rows = [r._replace(model=models[i % 3], prompt_tokens=i, completion_tokens=2 * i, actual_cost_pico=1_000_003 * i)
            for i, r in enumerate(rows)]
    await store.record_usage(rows)
    assert await store.record_usage(rows[:50]) == 0  # a replayed batch moves no figure
    month = await store.usage_totals(account_id=gw.user_id, since=month_start, group_by="model")
    async with aiohttp.ClientSession(headers=BEARER) as http:
        async with http.get(gw.url + f"/dashboard/overview?account={gw.user_id}&days=90") as response:
            assert response.status == 200
            page = await response.text()
    requests = int(re.search(r"<h2>Requests this month</h2><p class=\"big\">([\d,]+)</p>", page).group(1)
                   .replace(",", ""))
    assert requests == sum(t.requests for t in month) == sum(r.ts >= month_start for r in rows)
    tokens = re.search(r"<p class=\"muted\">([\d,]+) tokens</p>", page).group(1).replace(",", "")
    assert int(tokens) == sum(t.prompt_tokens + t.completion_tokens for t in month)
    by_model = re.findall(r"<tr><td>([^<]+)</td><td class=\"num\">([\d,]+)</td><td class=\"num\">([\d,]+)</td>"
                          r"<td class=\"num\">([\d,]+)</td>", page)
    assert [(m, int(n.replace(",", "")), int(p.replace(",", "")), int(c.replace(",", "")))
            for m, n, p, c in by_model] == [(t.group or "(none)", t.requests, t.prompt_tokens, t.completion_tokens)
                                            for t in sorted(month, key=lambda t: t.group)]
    # The 90 days' charts: the requests per day add up to the store's totals of those days.
    shown = (now - timedelta(days=89)).replace(hour=0, minute=0, second=0, microsecond=0)
    days = await store.usage_totals(account_id=gw.user_id, since=shown, group_by="day")
    assert sum(t.requests for t in days) == sum(r.ts >= shown for r in rows) > requests


async def test_usage_page_filters_by_status_in_the_store(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream, auth=AUTH))
    store = gw.app[STORE]
    now = datetime.now(UTC)
    # 2,000 successes, then three 402s deep in the log: the page finds them all at once.
    rows = [_row(i, gw.user_id, now - timedelta(minutes=i)) for i in range(2000)]
    rows = [r._replace(status=402 if i in (1500, 1700, 1999) else 200) for i, r in enumerate(rows)]
    await store.record_usage(rows)
    async with aiohttp.ClientSession(headers=BEARER) as http:
        async with http.get(gw.url + f"/dashboard/usage?account={gw.user_id}&status=402") as response:
            assert response.status == 200
            page = await response.text()
        assert len(re.findall(r"<td>402</td>", page)) == 3 and "<td>200</td>" not in page
        assert 'rel="next"' not in page
        async with http.get(gw.url + f"/dashboard/usage?account={gw.user_id}&status=ok") as response:
            page = await response.text()
        assert len(re.findall(r"<td>200</td>", page)) == 50 and 'rel="next"' in page
        async with http.get(gw.url + f"/dashboard/usage?account={gw.user_id}&status=302") as response:
            assert response.status == 400


async def test_the_usage_page_says_where_the_rolled_up_days_went(upstream: FakeUpstream, start_gateway) -> None:
    """usage.rollup_after_days: the list stops at the first kept day, and the page says why."""
    gw = await start_gateway(gateway_config(upstream, auth=AUTH, usage={"rollup_after_days": 3}))
    now = datetime.now(UTC)
    await gw.app[STORE].record_usage([_row(1, gw.user_id, now - timedelta(minutes=5))])
    first_kept = (now.date() - timedelta(days=3)).isoformat()
    async with aiohttp.ClientSession(headers=BEARER) as http:
        async with http.get(gw.url + f"/dashboard/usage?account={gw.user_id}") as response:
            assert response.status == 200
            page = await response.text()
    assert f"Requests before {first_kept} are kept as daily totals only" in page
    assert "request rows for 3 days" in page and len(re.findall(r"<tr><td>\d{4}-", page)) == 1

    plain = await start_gateway(gateway_config(upstream, auth=AUTH))
    async with aiohttp.ClientSession(headers=BEARER) as http:
        async with http.get(plain.url + f"/dashboard/usage?account={plain.user_id}") as response:
            assert "daily totals only" not in await response.text()
