"""One live gateway (fake upstream, Clerk, the admin token, DodoPayments) and one headless Chromium
for the browser tests (one of each per module; the suite has one browser module).

The gateway runs on its own event loop in a thread, so the tests drive the browser with Playwright's
sync API and call the gateway with the sync ``openai`` SDK. The browser is Debian's
``/usr/bin/chromium`` (never downloaded): without it the suite skips, except in CI (``CI=true``),
where it fails. Screenshots of each page go to ``screenshots/dashboard/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from nexgate_plugins import payments
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.store import Store
from nexgate_proxy.testing import FakeUpstream, Gateway, gateway_config
from nexgate_proxy.testing.gateway import running_gateways
from tests.jwt_signing import public_pem, sign_rs256

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ADMIN_TOKEN = "ngadmin-dashboard-token-7e1f0c2d3b4a59687786a5b4c3d2e1f0"
ISSUER = "https://clerk.example.com"
APP = "https://app.example.com"
SECRET = "whsec_" + "ZGFzaGJvYXJkLXRlc3Qtd2ViaG9vay1zZWNyZXQtMzJieXRlcw=="
CHECKOUT = "https://checkout.dodopayments.com/buy/prod_ten"
SHOTS = Path(__file__).resolve().parents[3] / "screenshots" / "dashboard"


@dataclass
class Live:
    """The running gateway and what the tests need to reach into it."""
    loop: asyncio.AbstractEventLoop
    gw: Gateway
    key: rsa.RSAPrivateKey
    users: dict[str, str] = field(default_factory=dict)
    """Clerk subject -> local user id."""
    org_id: str = ""

    @property
    def url(self) -> str:
        return self.gw.url

    @property
    def store(self) -> Store:
        return self.gw.app[STORE]

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def jwt(self, sub: str) -> str:
        now = int(time.time())
        return sign_rs256(self.key, {"iss": ISSUER, "sub": sub, "sid": f"sess_{sub}", "azp": APP, "iat": now - 5,
                                     "nbf": now - 5, "exp": now + 3600})

    def pay(self, account_id: str, payment_id: str, quantity: int = 1) -> None:
        """A signed DodoPayments ``payment.succeeded`` delivery, as the webhook receives it."""
        import urllib.request
        body = json.dumps({"business_id": "bus_1", "type": "payment.succeeded", "timestamp": "2025-01-15T10:00:00Z",
                           "data": {"payload_type": "Payment", "payment_id": payment_id, "total_amount": 1000 * quantity,
                                    "currency": "USD", "status": "succeeded",
                                    "metadata": {"nexgate_account_id": account_id},
                                    "product_cart": [{"product_id": "prod_ten", "quantity": quantity}]}}).encode()
        stamp = str(int(time.time()))
        webhook_id = f"msg_{payment_id}"
        signature = payments.sign(payments.decode_secret(SECRET), webhook_id, stamp, body)
        request = urllib.request.Request(self.url + "/webhooks/dodopayments", data=body, method="POST", headers={
            "content-type": "application/json", "webhook-id": webhook_id, "webhook-timestamp": stamp,
            "webhook-signature": f"v1,{signature}"})
        with urllib.request.urlopen(request) as response:
            assert response.status == 200


def _config(upstream: FakeUpstream, key: rsa.RSAPrivateKey) -> dict[str, Any]:
    price = {"input": 1000, "output": 2000}  # USD per million tokens: a visible cost per request
    return gateway_config(
        upstream,
        models={"gpt-test": {"route": [{"provider": "fake", "model": "upstream-model"}], "price": price},
                "claude-test": {"route": [{"provider": "fake-anthropic", "model": "claude-upstream"}], "free": True}},
        auth={"bcrypt_rounds": 4, "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(),
              "clerk": {"issuer": ISSUER, "public_key": public_pem(key).decode(), "authorized_parties": [APP]}},
        payments={"dodopayments": {"webhook_secrets": [SECRET], "products": {"prod_ten": {"credit_usd": "10"}}}},
        dashboard={"checkout": {"prod_ten": {"url": CHECKOUT, "label": "Buy $10 of credits"}},
                   "business": {"name": "Example Gateway Ltd", "address": ["1 Main Street", "Springfield"],
                                "tax_id": "EU123456789", "email": "billing@example.com", "invoice_prefix": "EX-"}},
        usage={"flush_interval": 0.2},
    )


async def _org_history(store: Store, org_id: str) -> None:
    """A month of the organization's traffic, so its overview has something to chart."""
    from datetime import UTC, datetime, timedelta
    from nexgate_proxy.store import NewLedgerEntry, UsageRecord
    await store.apply_ledger_entry(NewLedgerEntry(account_id=org_id, kind="grant", amount_pico=50 * 10**12,
                                                  source="admin", external_id="grant:seed", description="seed"))
    now = datetime.now(UTC)
    rows = []
    for i in range(240):
        model = ("gpt-4o", "gpt-4o-mini", "claude-sonnet")[(i // 30 + i // 90) % 3]
        prompt, completion = 200 + (i * 37) % 900, 50 + (i * 53) % 400
        cost = (prompt * 2 + completion * 8) * 10**6
        rows.append(UsageRecord(
            request_id=f"seed-{i}", ts=now - timedelta(days=i % 30, minutes=i), endpoint="chat.completions",
            model=model, provider="openai", upstream_model=model, account_id=org_id, org_id=org_id, key_id=None,
            key_prefix=None, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=0,
            usage_estimated=False, estimated_cost_pico=cost, actual_cost_pico=cost, latency_ms=300 + (i * 91) % 1500,
            status=200 if i % 17 else 429, error_code=None if i % 17 else "rate_limited", stream=False,
            client_ip=None, attempts=1))
    await store.record_usage(rows)


# Module scope, not session: Playwright's sync API keeps an event loop running in the main thread
# while it is open, which the rest of the suite's asyncio tests could not run beside.
@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stack = AsyncExitStack()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    directory = tmp_path_factory.mktemp("dashboard")

    async def start() -> Live:
        upstream = await stack.enter_async_context(FakeUpstream())
        starter = await stack.enter_async_context(running_gateways(directory))
        config = _config(upstream, key)
        config["usage"]["outbox_dir"] = str(directory / "outbox")
        gw = await starter(config)
        live = Live(loop, gw, key)
        store = gw.app[STORE]
        for sub, email in (("user_alice", "alice@example.com"), ("user_bob", "bob@example.com"),
                           ("user_carol", "carol@example.com"), ("user_dave", "dave@example.com")):
            user = await store.create_user(external_id=sub, email=email, name=sub.split("_")[1].title())
            live.users[sub] = user.id
        org = await store.create_org("Acme", live.users["user_alice"])
        await store.add_member(org.id, live.users["user_bob"], "member")
        await store.add_member(org.id, live.users["user_carol"], "member")
        live.org_id = org.id
        await _org_history(store, org.id)
        return live

    result = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    try:
        yield result
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


class Pages:
    """One signed-in browser context: ``open(path)`` goes to a dashboard page and screenshots it."""

    def __init__(self, live: Live, context: Any) -> None:
        self.live, self.context = live, context
        self.page = context.new_page()
        self.console_errors: list[str] = []
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)

    def assert_no_csp_violation(self) -> None:
        """The pages' own script and styles all load under the strict Content-Security-Policy."""
        assert [e for e in self.console_errors if "Content Security Policy" in e] == []

    def open(self, path: str, shot: str | None = None) -> Any:
        response = self.page.goto(self.live.url + "/dashboard" + path)
        if shot:
            self.shot(shot)
        return response

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def as_user(live: Live, browser: Any) -> Iterator[Any]:
    """``as_user("user_alice")``: a fresh context signed in through Clerk's ``__session`` cookie."""
    contexts = []
    opened: list[Pages] = []

    def sign_in(sub: str) -> Pages:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        context.add_cookies([{"name": "__session", "value": live.jwt(sub), "url": live.url}])
        pages = Pages(live, context)
        opened.append(pages)
        pages.open("/login")
        assert pages.page.url.endswith("/dashboard/overview"), pages.page.url
        return pages

    yield sign_in
    for pages in opened:
        pages.assert_no_csp_violation()
    for context in contexts:
        context.close()
