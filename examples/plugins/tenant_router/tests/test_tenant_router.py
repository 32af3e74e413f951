"""The tenant router through a real gateway: the header picks the route, the key's allowed models bound it."""

import openai
import pytest

import nexgate_tenant_router
from nexgate_proxy.accounts import create_api_key
from nexgate_proxy.app import build_app
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.config import ConfigError, parse_config
from nexgate_proxy.testing import RecordingPlugin, gateway_config

HI = [{"role": "user", "content": "hi"}]


def tenant_config(upstream, **router):
    config = gateway_config(upstream, tenant_router={"tenants": {"acme": {"gpt-test": "gpt-test-acme"},
                                                                 "globex": {}}, **router})
    config["models"]["gpt-test-acme"] = {"route": [{"provider": "fake", "model": "acme-deployment"}], "free": True}
    return config


async def test_the_header_picks_the_tenants_route_and_usage_keeps_the_asked_model(nexgate_upstream,
                                                                                nexgate_start_gateway):
    recorder = RecordingPlugin()
    gw = await nexgate_start_gateway(tenant_config(nexgate_upstream), plugins=[nexgate_tenant_router, recorder])
    client = gw.openai_client()
    raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=HI,
                                                                 extra_headers={"x-tenant": "acme"})
    assert raw.headers["x-nexgate-model"] == "gpt-test-acme"  # served by the tenant's route
    await client.chat.completions.create(model="gpt-test", messages=HI)  # no header: the model's own route
    await client.chat.completions.create(model="gpt-test", messages=HI, extra_headers={"x-tenant": "globex"})
    assert [r.body["model"] for r in nexgate_upstream.received] == ["acme-deployment", "upstream-model",
                                                                     "upstream-model"]
    assert [(r.model, r.upstream_model) for r in recorder.records] == [
        ("gpt-test", "acme-deployment"), ("gpt-test", "upstream-model"), ("gpt-test", "upstream-model")]


async def test_a_key_cannot_reach_a_tenant_route_it_may_not_use(nexgate_upstream, nexgate_start_gateway):
    gw = await nexgate_start_gateway(tenant_config(nexgate_upstream), plugins=[nexgate_tenant_router])
    key = await create_api_key(gw.app[STORE], name="only-gpt-test", user_id=gw.user_id, bcrypt_rounds=4,
                               allowed_models=["gpt-test"])
    client = gw.openai_client(key.plaintext)
    await client.chat.completions.create(model="gpt-test", messages=HI)
    with pytest.raises(openai.PermissionDeniedError) as err:
        await client.chat.completions.create(model="gpt-test", messages=HI, extra_headers={"x-tenant": "acme"})
    assert err.value.body["code"] == "model_not_allowed"
    assert len(nexgate_upstream.received) == 1


async def test_unknown_or_missing_tenants_are_400s(nexgate_upstream, nexgate_start_gateway):
    gw = await nexgate_start_gateway(tenant_config(nexgate_upstream, required=True, header="x-org"),
                                     plugins=[nexgate_tenant_router])
    client = gw.openai_client()
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="gpt-test", messages=HI)
    assert (err.value.body["code"], err.value.body["param"]) == ("missing_tenant", "x-org")
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="gpt-test", messages=HI, extra_headers={"x-org": "<evil>"})
    assert err.value.body["code"] == "unknown_tenant" and "<evil>" not in err.value.body["message"]
    assert nexgate_upstream.received == []


def test_routes_to_unknown_aliases_are_config_problems(nexgate_upstream):
    config = parse_config(gateway_config(nexgate_upstream, tenant_router={
        "tenants": {"acme": {"gpt-test": "gpt-test-acme", "nope": "gpt-test"}}, "headr": "x"}))
    with pytest.raises(ConfigError) as err:
        build_app(config, extra_plugins=[nexgate_tenant_router])
    assert err.value.problems == [
        "tenant_router.headr: unknown key; did you mean 'header'?",
        "tenant_router.tenants.acme.gpt-test: routes to 'gpt-test-acme', which is not a model alias under models:",
        "tenant_router.tenants.acme.nope: unknown model alias 'nope'",
    ]
