"""Identities forwarded by a trusted proxy, through a real gateway: same identity as key auth, same usage rows."""

import time

import openai
import pytest

import nexgate_trusted_identity
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.testing import RecordingPlugin, chat, gateway_config

SECRET = "s" * 40
HI = [{"role": "user", "content": "hi"}]


def signed(subject, secret=SECRET, at=None):
    timestamp = str(int(time.time() if at is None else at))
    return {"x-authenticated-user": subject, "x-identity-timestamp": timestamp,
            "x-identity-signature": nexgate_trusted_identity.sign(secret, timestamp, subject)}


async def start(upstream, start_gateway, recorder=None, extra=None, **section):
    settings = {"proxies": ["127.0.0.1/32"], "hmac_secret": SECRET, **section}
    gw = await start_gateway(gateway_config(upstream, trusted_identity=settings, **(extra or {})),
                             plugins=[nexgate_trusted_identity, *([recorder] if recorder else [])])
    user = await gw.app[STORE].create_user(external_id="sso|alice", email="alice@example.com")
    return gw, user


async def test_a_signed_identity_from_the_proxy_is_the_users_identity(nexgate_upstream, nexgate_start_gateway):
    recorder = RecordingPlugin()
    gw, alice = await start(nexgate_upstream, nexgate_start_gateway, recorder)
    client = gw.openai_client(api_key="no-key-needed")
    for _ in range(2):
        reply = await client.chat.completions.create(model="gpt-test", messages=HI,
                                                     extra_headers=signed("sso|alice"))
        assert reply.choices[0].message.content == "Hello from upstream"
    assert await chat(gw) == "Hello from upstream"  # without the header: the built-in key auth, as before
    via_proxy, via_key = recorder.records[0], recorder.records[2]
    assert (via_proxy.account_id, via_proxy.key_prefix) == (alice.id, None)
    assert via_key.account_id == gw.user_id and via_key.key_prefix is not None
    cache = gw.app[nexgate_trusted_identity.TRUSTED].cache
    assert list(cache) == ["sso|alice"]  # looked up once, then cached


# Headers made when the test runs (signatures are only fresh for max_skew seconds).
@pytest.mark.parametrize("headers, message", [
    (lambda: {"x-authenticated-user": "sso|alice"}, "missing or too old"),
    (lambda: signed("sso|alice", at=time.time() - 3600), "missing or too old"),
    (lambda: signed("sso|alice", secret="t" * 40), "does not match"),
    (lambda: {**signed("sso|mallory"), "x-authenticated-user": "sso|alice"}, "does not match"),
    (lambda: signed("sso|nobody"), "not a user of this gateway"),
], ids=["unsigned", "stale", "wrong-secret", "other-subject", "unknown-user"])
async def test_an_identity_that_cannot_be_believed_is_a_401(nexgate_upstream, nexgate_start_gateway, headers, message):
    gw, _ = await start(nexgate_upstream, nexgate_start_gateway)
    with pytest.raises(openai.AuthenticationError) as err:
        await gw.openai_client().chat.completions.create(model="gpt-test", messages=HI, extra_headers=headers())
    assert err.value.body["code"] == "invalid_identity" and message in err.value.body["message"]
    assert nexgate_upstream.received == []


async def test_only_the_trusted_proxies_may_assert_identities(nexgate_upstream, nexgate_start_gateway):
    gw, _ = await start(nexgate_upstream, nexgate_start_gateway, proxies=["10.0.0.0/8"])
    with pytest.raises(openai.AuthenticationError) as err:
        await gw.openai_client().chat.completions.create(model="gpt-test", messages=HI,
                                                         extra_headers=signed("sso|alice"))
    assert "trusted proxies" in err.value.body["message"]


async def test_the_rate_limiters_ip_deny_list_still_comes_first(nexgate_upstream, nexgate_start_gateway):
    gw, _ = await start(nexgate_upstream, nexgate_start_gateway, extra={"limits": {"deny": ["127.0.0.1/32"]}})
    with pytest.raises(openai.PermissionDeniedError):
        await gw.openai_client().chat.completions.create(model="gpt-test", messages=HI,
                                                         extra_headers=signed("sso|alice"))
