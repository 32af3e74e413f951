"""The hook chain as a plugin author meets it."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import aiohttp
import openai
import pytest

from nexgate_proxy import GatewayError, Identity, RecordRejected, hookimpl, hookspecs
from nexgate_proxy.app import build_app
from nexgate_proxy.config import parse_config
from nexgate_proxy.plugins import PluginError
from nexgate_proxy.testing import FakeUpstream, RecordingPlugin, gateway_config

ROOT = Path(__file__).resolve().parents[2]


async def test_a_request_phase_can_reject_and_final_phases_still_run(upstream: FakeUpstream, start_gateway) -> None:
    class Bouncer:
        @hookimpl
        async def nexgate_admit(self, ctx):
            if ctx.body.get("user") == "mallory":
                raise GatewayError(429, "Slow down.", code="rate_limit_requests", headers={"Retry-After": "7"})

    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[Bouncer(), recorder])
    with pytest.raises(openai.RateLimitError) as err:
        await gw.openai_client().chat.completions.create(model="gpt-test", user="mallory",
                                                 messages=[{"role": "user", "content": "hi"}])
    assert err.value.response.headers["Retry-After"] == "7"
    assert err.value.body["code"] == "rate_limit_requests"
    assert upstream.received == []
    assert recorder.settled and recorder.records[-1].status == 429
    assert recorder.records[-1].error_code == "rate_limit_requests"


async def test_identity_and_argument_subsets(upstream: FakeUpstream, start_gateway) -> None:
    calls: list[str] = []

    class Auth:
        @hookimpl
        def nexgate_authenticate(self, ctx):  # a plain function works too
            calls.append(f"auth body={ctx.body}")
            return Identity(account_id="acct_1", key_prefix="ngk_abc", org_id="org_9")

        @hookimpl
        def nexgate_reserve(self):  # accepts no argument at all
            calls.append("reserve")

    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[Auth(), recorder])
    await gw.openai_client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    # authenticate runs before the body is read; reserve after routing.
    assert calls == ["auth body=None", "reserve"]
    record = recorder.records[-1]
    assert (record.account_id, record.key_prefix, record.org_id) == ("acct_1", "ngk_abc", "org_9")


async def test_order_follows_tryfirst_and_a_guard_drops_records(upstream: FakeUpstream, start_gateway) -> None:
    order: list[str] = []

    class Late:
        @hookimpl(trylast=True)
        def nexgate_admit(self):
            order.append("late")

    class Early:
        @hookimpl(tryfirst=True)
        def nexgate_admit(self):
            order.append("early")

    class Guard:
        @hookimpl
        def nexgate_guard_record(self, record):
            raise RecordRejected("no")

    class Broken:
        @hookimpl
        def nexgate_record(self, record):
            raise RuntimeError("sink down")

    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[Late(), Early(), Guard(), Broken(), recorder])
    completion = await gw.openai_client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert completion.choices[0].message.content
    assert order == ["early", "late"]
    assert recorder.settled and recorder.records == []


async def test_a_failing_sink_does_not_break_others(upstream: FakeUpstream, start_gateway) -> None:
    class Broken:
        @hookimpl(tryfirst=True)
        def nexgate_record(self, record):
            raise RuntimeError("sink down")

    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[Broken(), recorder])
    await gw.openai_client().embeddings.create(model="gpt-test", input="x")
    assert len(recorder.records) == 1


def test_misspelt_hooks_and_wrappers_fail_at_startup(upstream: FakeUpstream) -> None:
    config = parse_config(gateway_config(upstream))

    class Misspelt:
        @hookimpl
        def nexgate_admitt(self, ctx):
            pass

    with pytest.raises(PluginError, match="nexgate_admitt"):
        build_app(config, extra_plugins=[Misspelt()])

    class Wrapper:
        @hookimpl(wrapper=True)
        def nexgate_admit(self, ctx):
            return (yield)

    with pytest.raises(PluginError, match="wrapper"):
        build_app(config, extra_plugins=[Wrapper()])


async def test_plugins_from_a_directory_and_from_config_modules(tmp_path: Path, upstream: FakeUpstream,
                                                                start_gateway) -> None:
    (tmp_path / "tagger.py").write_text(textwrap.dedent("""
        from nexgate_proxy import hookimpl

        @hookimpl
        def nexgate_admit(ctx):
            ctx.response_headers["x-tagged-by"] = "directory-plugin"
    """))
    config = gateway_config(upstream, plugins={"directory": str(tmp_path), "modules": ["tests.plugin_module"]})
    gw = await start_gateway(config)
    raw = await gw.openai_client().chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-tagged-by"] == "directory-plugin"
    assert raw.headers["x-module-plugin"] == "yes"


def test_a_builtin_can_be_disabled(upstream: FakeUpstream) -> None:
    app = build_app(parse_config(gateway_config(upstream, plugins={"disable": ["metrics"]})))
    assert "/metrics" not in {r.resource.canonical for r in app.router.routes() if r.resource}


def _hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("nexgate_")]


@pytest.mark.parametrize("hook", _hook_names())
def test_every_hook_is_documented(hook: str) -> None:
    spec = getattr(hookspecs, hook)
    assert spec.__doc__ and len(spec.__doc__.strip()) > 40, f"{hook} needs a docstring saying when it runs"
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert f"### `{hook}`" in docs, f"docs/plugins.md has no section for {hook}"


_HOOK_HEADING = re.compile(r"^### `(nexgate_\w+)`\s*$")
_DOCUMENTED_ARGS = re.compile(r"^`\(([^)`]*)\)`")


def documented_signatures(markdown: str) -> dict[str, list[str] | None]:
    """Each "### `hook`" heading of the hook reference -> the argument names its next line starts with.

    None when that line does not start with an argument list in backticks, e.g. "`(app, config)`, async: ...".
    """
    lines = markdown.splitlines()
    found: dict[str, list[str] | None] = {}
    for i, line in enumerate(lines):
        heading = _HOOK_HEADING.match(line)
        if heading:
            following = next((text for text in lines[i + 1:] if text.strip()), "")
            args = _DOCUMENTED_ARGS.match(following)
            names = None if args is None else [a.strip() for a in args.group(1).split(",") if a.strip()]
            found[heading.group(1)] = names
    return found


def test_documented_signatures_are_read_from_the_line_after_the_heading() -> None:
    sample = ("### `nexgate_a`\n`(app, config)`, async: ...\n\n"
              "### `nexgate_b`\n`()`: none\n### `nexgate_c`\nProse.\n")
    assert documented_signatures(sample) == {"nexgate_a": ["app", "config"], "nexgate_b": [], "nexgate_c": None}


_DOCUMENTED = documented_signatures((ROOT / "docs" / "plugins.md").read_text())


@pytest.mark.parametrize("hook", sorted(_DOCUMENTED))
def test_a_documented_hook_exists_with_the_documented_arguments(hook: str) -> None:
    spec = getattr(hookspecs, hook, None)
    assert inspect.isfunction(spec), f"docs/plugins.md documents {hook}, which hookspecs.py does not define"
    documented = _DOCUMENTED[hook]
    assert documented is not None, (f"docs/plugins.md: the line after ### `{hook}` must start with its arguments "
                                    f"in backticks, e.g. `(app, config)`, or `()` for none")
    assert documented == list(inspect.signature(spec).parameters), f"docs/plugins.md: {hook} arguments"


async def test_metrics_count_requests_tokens_and_latency_from_records(start_gateway, upstream: FakeUpstream) -> None:
    gw = await start_gateway(gateway_config(upstream))
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.api_key, max_retries=0)
    for _ in range(3):
        await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    assert 'nexgate_requests_total{endpoint="chat.completions",model="gpt-test",provider="fake",status="200",status_class="2xx"} 3.0' in text
    assert 'nexgate_requests_total{endpoint="chat.completions",model="-",provider="-",status="404",status_class="4xx"} 1.0' in text
    # The fake upstream reports 11 prompt and 7 completion tokens per answer.
    assert 'nexgate_tokens_total{kind="prompt",model="gpt-test",provider="fake"} 33.0' in text
    assert 'nexgate_tokens_total{kind="completion",model="gpt-test",provider="fake"} 21.0' in text
    assert ('nexgate_request_duration_seconds_count{endpoint="chat.completions",model="gpt-test",provider="fake"} 3.0'
            in text)
    assert ('nexgate_request_duration_seconds_bucket{endpoint="chat.completions",le="+Inf",model="-",provider="-"} 1.0'
            in text)


async def test_a_plugin_can_unplug_its_request_hooks_at_startup(upstream: FakeUpstream, start_gateway) -> None:
    """What tracing does without an endpoint: its hooks leave the chain and cost nothing per request."""
    from nexgate_proxy.appkeys import CHAIN

    calls: list[str] = []

    class Idle:
        __name__ = "idle-plugin"

        @hookimpl
        def nexgate_admit(self, ctx):
            calls.append("admit")

        @hookimpl
        def nexgate_upstream_attempt(self, ctx, target, headers):
            calls.append("attempt")

        @hookimpl
        def nexgate_upstream_done(self, ctx, target, status, error_code):
            calls.append("done")

        @hookimpl
        async def nexgate_lifespan(self, app):
            app[CHAIN].unplug("idle-plugin", "nexgate_admit", "nexgate_upstream_attempt")
            yield

    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[Idle(), recorder])
    await gw.openai_client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert calls == ["done"]  # the hook it kept still runs
    assert recorder.records[-1].status == 200
    assert gw.app[CHAIN].attempt_hooks is False  # tracing (off by default) unplugged its own too
