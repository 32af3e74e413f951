"""The dashboard in a real headless Chromium: a user, an org owner, a plain member and the operator walk
every page; keys work with the openai SDK and stop working when revoked; CSRF-less posts are refused."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

import openai

from tests.plugins.dashboard.conftest import ADMIN_TOKEN, CHECKOUT, Live, Pages


def wait_for(check: Callable[[], Any], what: str, seconds: float = 10) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def client(live: Live, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0)


def test_user_creates_uses_and_revokes_a_key(live: Live, as_user) -> None:
    alice_id = live.users["user_alice"]
    live.pay(alice_id, "pay_alice_1")
    me: Pages = as_user("user_alice")
    page = me.page
    assert "$10.00" in page.inner_text(".cards")
    assert "No requests in the last 30 days" in page.inner_text("main")  # the empty state says what to do
    me.shot("overview-empty")

    me.open("/keys", "keys")
    page.fill("input[name=name]", "laptop")
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/dashboard/keys")) as created:
        page.click("form.stack button[type=submit]")
    assert created.value.status == 201
    assert created.value.headers["cache-control"] == "no-store"
    assert "you will not see it again" in page.inner_text("main")
    plaintext = page.inner_text("#new-key").strip()
    assert plaintext.startswith("ng") or len(plaintext) > 20
    assert page.is_visible("button[data-copy=new-key]")
    me.shot("key-created")

    reply = client(live, plaintext).chat.completions.create(model="gpt-test",
                                                            messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content

    prefix = None
    me.open("/keys")
    row = page.locator("tr", has_text="laptop")
    prefix = row.locator("code").inner_text()

    def usage_row() -> bool:
        me.open("/usage")
        return page.locator("tbody tr", has_text=prefix).count() == 1
    wait_for(usage_row, "the usage row")
    cells = page.locator("tbody tr", has_text=prefix).inner_text()
    assert "gpt-test" in cells and "200" in cells
    me.shot("usage")

    download = page.request.get(live.url + "/dashboard/usage/export?format=csv")
    assert download.status == 200 and "attachment" in download.headers["content-disposition"]
    lines = download.text().strip().splitlines()
    assert lines[0].startswith("request_id,ts,endpoint,model") and len(lines) == 2 and prefix in lines[1]
    exported = page.request.get(live.url + "/dashboard/usage/export?format=json").json()
    assert [r["key_prefix"] for r in exported["data"]] == [prefix]

    me.open("/credits", "credits")
    balance = page.inner_text(".cards .big")
    assert balance != "$10.00" and balance.startswith("$9.")
    assert "pay_alice_1" in page.inner_text("table")
    assert "402" in page.inner_text("main")
    link = page.get_attribute("ul.buy a", "href")
    parsed = urlparse(link)
    assert f"{parsed.scheme}://{parsed.netloc}{parsed.path}" == CHECKOUT
    assert parse_qs(parsed.query)["metadata_nexgate_account_id"] == [alice_id]

    me.open("/overview", "overview")
    assert page.locator("svg[role=img]").count() == 3
    assert "1" in page.inner_text(".cards")

    me.open("/statements", "statements")
    month = datetime.now(UTC).strftime("%Y-%m")
    page.click(f"a:text-is('{month}')")
    assert f"Statement for {month}" in page.inner_text("h1")
    assert "Closing balance" in page.inner_text("body")
    me.shot("statement")
    me.open("/statements")
    page.click("a:text-matches('EX-\\\\d+')")
    invoice = page.inner_text("main")
    assert "Example Gateway Ltd" in invoice and "EU123456789" in invoice and "pay_alice_1" in invoice
    assert "alice" in invoice.lower()
    me.shot("invoice")

    me.open("/keys")
    page.click("tr:has-text('laptop') >> text=Revoke…")
    page.click("button:text('Revoke key')")
    assert page.url.endswith("/dashboard/keys")
    assert page.locator("tr", has_text="laptop").count() == 0

    def refused() -> bool:
        try:
            client(live, plaintext).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
        except openai.AuthenticationError:
            return True
        return False
    wait_for(refused, "the revoked key to be refused")

    me.open("/privacy", "privacy")
    document = page.request.get(live.url + "/dashboard/privacy/export?format=json")
    assert document.status == 200
    assert document.json()["user"]["email"] == "alice@example.com"


def test_org_owner_manages_members_and_org_keys(live: Live, as_user) -> None:
    live.run(_personal_key(live, "user_bob", "bob-secret-personal"))
    owner: Pages = as_user("user_alice")
    owner.open(f"/orgs/{live.org_id}", "organization")
    page = owner.page
    text = page.inner_text("main")
    assert "bob@example.com" in text and "organization balance" in text.lower()
    assert "bob-secret-personal" not in text  # never a member's personal keys
    page.select_option("select[aria-label='Role of bob@example.com']", "admin")
    page.click(f"form[action$='/members/{live.users['user_bob']}/role'] button")
    assert live.run(live.store.get_role(live.org_id, live.users["user_bob"])) == "admin"
    page.select_option("select[aria-label='Role of bob@example.com']", "member")
    page.click(f"form[action$='/members/{live.users['user_bob']}/role'] button")
    page.fill("form[action$='/members'] input[name=user_id]", live.users["user_dave"])
    page.click("form[action$='/members'] button")
    assert "dave@example.com" in page.inner_text("main")
    page.click(f"form[action$='/members/{live.users['user_dave']}/remove'] button")
    assert "dave@example.com" not in page.inner_text("main")
    page.fill("form.stack input[name=name]", "acme-ci")
    page.click("form.stack button[type=submit]")
    assert "you will not see it again" in page.inner_text("main")
    key = page.inner_text("#new-key").strip()
    reply = client(live, key).chat.completions.create(model="claude-test", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content
    owner.open(f"/orgs/{live.org_id}")
    assert "acme-ci" in page.inner_text("main")
    owner.open(f"/overview?account={live.org_id}&days=30", "overview-organization")
    assert page.locator("svg[role=img]").count() == 3
    assert "gpt-4o-mini" in page.inner_text(".legend >> nth=0")
    owner.open(f"/usage?account={live.org_id}&status=429", "usage-organization")
    assert page.locator("tbody tr").count() > 5 and "429" in page.inner_text("tbody")


async def _personal_key(live: Live, sub: str, name: str) -> str:
    from nexgate_proxy.accounts import create_api_key
    created = await create_api_key(live.store, name=name, user_id=live.users[sub], bcrypt_rounds=4)
    return created.row.id


def test_member_cannot_reach_other_peoples_pages(live: Live, as_user) -> None:
    alice_key = live.run(_personal_key(live, "user_alice", "alice-private"))
    member: Pages = as_user("user_bob")
    page = member.page
    response = member.open(f"/orgs/{live.org_id}", "organization-member")
    assert response.status == 200 and "member" in page.inner_text("main")
    assert "alice-private" not in page.inner_text("main")
    alice = live.users["user_alice"]
    for path, status in ((f"/keys/{alice_key}/revoke", 404), (f"/overview?account={alice}", 404),
                         (f"/usage?account={alice}", 404), (f"/credits?account={alice}", 404),
                         (f"/statements/2025-01?account={alice}", 404), (f"/usage?account={live.org_id}", 403),
                         (f"/credits?account={live.org_id}", 403), ("/invoice?account=" + alice +
                                                                     "&source=dodopayments&ref=payment:pay_alice_1", 404),
                         ("/operator", 403), (f"/operator/accounts/{alice}", 403)):
        assert member.open(path).status == status, path
    forged = page.request.post(live.url + f"/dashboard/keys/{alice_key}/revoke", form={"csrf": "x"})
    assert forged.status == 403
    assert live.run(live.store.get_api_key(alice_key)).revoked_at is None
    member.open(f"/orgs/{live.org_id}")
    page.click("button:text('Leave organization')")
    assert page.url.endswith("/dashboard/orgs")
    assert live.run(live.store.get_role(live.org_id, live.users["user_bob"])) is None
    assert member.open(f"/orgs/{live.org_id}").status == 404  # now an outsider: the organization is not shown


def test_posts_without_the_csrf_token_are_refused(live: Live, as_user, browser) -> None:
    me: Pages = as_user("user_dave")
    me.open("/keys")
    token = me.page.get_attribute("input[name=csrf]", "value")
    assert me.page.request.post(live.url + "/dashboard/keys", form={"name": "no-token"}).status == 403
    assert me.page.request.post(live.url + "/dashboard/keys", form={"name": "bad", "csrf": "0" * 32}).status == 403
    assert me.page.request.post(live.url + "/dashboard/keys", form={"name": "evil", "csrf": token},
                                headers={"Origin": "https://evil.example"}).status == 403
    sneaky = "<img src=x onerror=alert(1)>"
    assert me.page.request.post(live.url + "/dashboard/keys", form={"name": sneaky, "csrf": token}).status == 201
    names = [k.name for k in live.run(live.store.list_api_keys(user_id=live.users["user_dave"]))]
    assert names == [sneaky]
    me.open("/keys")
    assert sneaky in me.page.inner_text("table") and me.page.locator("table img").count() == 0  # escaped
    anonymous = browser.new_context()
    try:
        assert anonymous.request.post(live.url + "/dashboard/keys", form={"name": "x"}).status == 403
        assert anonymous.request.post(live.url + "/dashboard/login", form={"token": ADMIN_TOKEN}).status == 403
        response = anonymous.request.get(live.url + "/dashboard/overview", max_redirects=0)
        assert response.status == 303 and "/dashboard/login" in response.headers["location"]
    finally:
        anonymous.close()
    headers = me.open("/overview").headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "script-src 'self'" in headers["content-security-policy"] and "unsafe-inline" not in \
        headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"


def test_operator_signs_in_with_the_admin_token(live: Live, browser) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        op = Pages(live, context)
        page = op.page
        op.open("/login", "sign-in")
        page.fill("input[name=token]", "wrong-token")
        page.click("form button[type=submit]")
        assert "Invalid admin token" in page.inner_text("main")
        op.open("/login")
        page.fill("input[name=token]", ADMIN_TOKEN)
        page.click("form button[type=submit]")
        assert page.url.endswith("/dashboard/operator")
        text = page.inner_text("main")
        assert "storage" in text and "ready" in text and "usage outbox backlog" in text and "gpt-test" in text
        op.shot("operator")
        page.fill("input[name=q]", "carol")
        page.click("form.filters button")
        page.click(f"a:text('{live.users['user_carol']}')")
        page.fill("input[name=usd]", "5")
        page.fill("input[name=reason]", "support credit")
        page.click("form[action$='/operator/grant'] button")
        assert "$5.00" in page.inner_text(".cards")
        assert live.run(live.store.get_balance(live.users["user_carol"])) == 5 * 10**12
        op.shot("operator-account")
        op.open(f"/operator/accounts/{live.org_id}")
        page.fill("input[name=rpm]", "600")
        page.click("form[action$='/limits'] button")
        org = live.run(live.store.get_org(live.org_id))
        assert dict(org.limits) == {"rpm": 600}
        carol_key = live.run(_personal_key(live, "user_carol", "carol-key"))
        op.open(f"/keys/{carol_key}/revoke")
        page.click("button:text('Revoke key')")
        assert live.run(live.store.get_api_key(carol_key)).revoked_at is not None
        op.open(f"/credits?account={live.users['user_carol']}")
        assert "support credit" in page.inner_text("table")
        op.assert_no_csp_violation()
        page.click("button:text('Sign out')")
        assert page.url.endswith("/dashboard/login")
        assert not [c for c in context.cookies(live.url + "/dashboard") if c["name"] == "nexgate_dashboard"]
        op.open("/operator")
        assert "/dashboard/login?next=" in page.url
    finally:
        context.close()


def test_user_deletes_their_account(live: Live, as_user) -> None:
    me: Pages = as_user("user_carol")
    page = me.page
    me.open("/privacy")
    page.fill("input[name=confirm]", "delete it")
    page.click("button.danger")
    assert "nothing was deleted" in page.inner_text("main")
    me.open("/privacy")
    page.fill("input[name=confirm]", "delete my account")
    page.click("button.danger")
    assert "Your account was deleted" in page.inner_text("main")
    me.shot("account-deleted")
    user = live.run(live.store.get_user(live.users["user_carol"]))
    assert user.deleted_at is not None and user.email is None
    assert me.page.context.cookies(live.url + "/dashboard") and not [
        c for c in me.page.context.cookies(live.url + "/dashboard") if c["name"] == "nexgate_dashboard"]
    # Clerk still vouches for the person: as the privacy policy says, they get a new, empty account.
    me.open("/overview")
    fresh = live.run(live.store.get_user_by_external_id("user_carol"))
    assert fresh is not None and fresh.id != live.users["user_carol"]
    assert "$0.00" in page.inner_text(".cards")
