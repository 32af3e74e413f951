"""Config sections: declared once by their owner (a plugin or the core), parsed once, every problem in one pass."""

from __future__ import annotations

import base64
import importlib.util
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from aiohttp import web

from nexgate_plugins.payments import PAYMENTS
from nexgate_proxy import hookimpl
from nexgate_proxy.app import build_app
from nexgate_proxy.config import CORE_SECTIONS, PRICE_KEYS, ConfigError, ConfigSection, load_config, parse_config
from nexgate_proxy.plugins import PluginError, build_plugin_manager, configure
from nexgate_proxy.testing import FakeUpstream, gateway_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "nexgate.yaml"


# ------------------------------------------------------- a third-party plugin


@dataclass(frozen=True)
class QuotaSettings:
    daily_requests: int = 100
    message: str = "Come back tomorrow."


def parse_quota(r: Any, section: dict[str, Any], config: Any) -> QuotaSettings:
    d = QuotaSettings()
    daily = r.value(section, "daily_requests", "quota", int, d.daily_requests,
                    lambda v: None if v > 0 else "must be greater than 0")
    if daily > 1000 and not config.models:  # a check across sections: the parser gets the core's config
        r.problem("quota.daily_requests", "above 1000 needs at least one model")
    return QuotaSettings(daily_requests=daily, message=r.value(section, "message", "quota", str, d.message))


QUOTA_SECTION = ConfigSection("quota", parse_quota, ("daily_requests", "message"), "A daily request quota.")
SEEN: web.AppKey[QuotaSettings] = web.AppKey("tests.quota", QuotaSettings)


class QuotaPlugin:
    """Declares its section like the built-ins do, and keeps what it was handed."""

    @hookimpl
    def nexgate_config_sections(self) -> list[ConfigSection[Any]]:
        return [QUOTA_SECTION]

    @hookimpl
    def nexgate_register_routes(self, app: web.Application, config: Any) -> None:
        app[SEEN] = config.section(QUOTA_SECTION)


def problems(data: dict[str, Any], plugins: list[object]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        build_app(parse_config(data, "test.yaml", env={}), extra_plugins=plugins)
    return err.value.problems


ECHO = {"providers": {"echo": {"type": "echo"}}, "models": {"m": {"route": [{"provider": "echo"}], "free": True}}}


def test_a_third_party_plugin_declares_a_section_and_gets_typed_settings() -> None:
    app = build_app(parse_config({**ECHO, "quota": {"daily_requests": "250", "message": "Enough."}}, env={}),
                    extra_plugins=[QuotaPlugin()])
    assert app[SEEN] == QuotaSettings(daily_requests=250, message="Enough.")
    # Left out, the section is its defaults; the typed object is what config.section returns.
    assert build_app(parse_config(ECHO, env={}), extra_plugins=[QuotaPlugin()])[SEEN] == QuotaSettings()


def test_its_problems_come_with_their_key_paths_together_with_everyone_elses() -> None:
    found = problems({
        **ECHO,
        "providers": {"echo": {"type": "echo"}, "local": {"type": "olama", "base_url": "http://localhost:1/v1"}},
        "models": {"m": {"route": [{"provider": "echo"}]}},   # no price while credits are on
        "quota": {"daily_requests": 0, "mesage": "typo"},
        "limits": {"redis_failure": "maybe"},
        "limts": {},
    }, [QuotaPlugin()])
    assert sorted(found) == sorted([
        "providers.local.type: unknown provider type 'olama' (known: anthropic, azure, echo, gemini, openai)",
        "models.m.price: required while credits are enabled (USD per 1M tokens, e.g. {input: 0.15, "
        "output: 0.60}), or set free: true",
        "quota.daily_requests: must be greater than 0",
        "quota.mesage: unknown key; did you mean 'message'?",
        "limits.redis_failure: must be 'open' (limit in-process) or 'closed' (refuse with 503), got 'maybe'",
        "limts: unknown key; did you mean 'limits'?",
    ])
    assert problems({"quota": {"daily_requests": 5000}}, [QuotaPlugin()]) == [
        "quota.daily_requests: above 1000 needs at least one model"]


def test_a_file_with_core_and_section_problems_reports_them_all_in_one_pass(tmp_path: Path) -> None:
    """`nexgate config check`: no stage where one kind of problem hides another."""
    (tmp_path / "plugins.d").mkdir()
    (tmp_path / "plugins.d" / "quota.py").write_text(textwrap.dedent("""
        from nexgate_proxy import hookimpl
        from nexgate_proxy.config import ConfigSection

        def parse(r, section, config):
            return r.value(section, "daily_requests", "quota", int, 100)

        @hookimpl
        def nexgate_config_sections():
            return [ConfigSection("quota", parse, ("daily_requests",), "A daily request quota.")]
    """))
    path = tmp_path / "nexgate.yaml"
    path.write_text(textwrap.dedent("""
        server: {port: 70000}
        plugins: {directory: ./plugins.d}
        providers: {echo: {type: echo}}
        models:
          m: {route: [{provider: echo}], price: {input: 0.0000001, output: 1}}
        quota: {daily_requests: lots}
        usage: {batch_size: 0}
        admin: {}
    """))
    result = subprocess.run([sys.executable, "-m", "nexgate_proxy.cli", "config", "check", str(path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}: 5 problem(s)", result.stderr
    assert sorted(lines[1:]) == sorted(f"  - {p}" for p in [
        "server.port: must be a port number between 0 and 65535",
        # As written in the file, not 1E-7.
        "models.m.route[0].price.input: 0.0000001 has more than 6 decimals per million tokens, "
        "which NexGate cannot charge exactly",
        "quota.daily_requests: expected an integer, got 'lots'",
        "usage.batch_size: must be between 1 and 10000",
        "admin: unknown key (known: server, storage, state, upstream, providers, models, plugins, logging, auth, "
        "limits, credits, payments, usage, metrics, tracing, privacy, dashboard, quota)",
    ])


def test_a_price_problem_found_once_the_core_is_fine_is_printed_as_written(tmp_path: Path) -> None:
    path = tmp_path / "nexgate.yaml"
    path.write_text("providers: {echo: {type: echo}}\n"
                    "models: {m: {route: [{provider: echo}], price: {input: 0.15, output: 0.0000001}}}\n")
    result = subprocess.run([sys.executable, "-m", "nexgate_proxy.cli", "config", "check", str(path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "models.m.route[0].price.output: 0.0000001 has more than 6 decimals" in result.stderr
    assert "1E-7" not in result.stderr


def test_every_token_class_price_is_checked_and_hinted(tmp_path: Path) -> None:
    path = tmp_path / "nexgate.yaml"
    path.write_text("providers: {echo: {type: echo}}\n"
                    "models: {m: {route: [{provider: echo}], price: {input: 3, output: 15, cache_write: 3.7500001}},\n"
                    "         n: {route: [{provider: echo}], price: {input: 3, output: 15, cache_writes: 3.75}}}\n")
    result = subprocess.run([sys.executable, "-m", "nexgate_proxy.cli", "config", "check", str(path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "models.n.price.cache_writes: unknown key; did you mean 'cache_write'?" in result.stderr
    assert "models.m.route[0].price.cache_write: 3.7500001 has more than 6 decimals" in result.stderr


# --------------------------------------------------------------- top level


@pytest.mark.parametrize("key, hint", [
    ("limts", "unknown key; did you mean 'limits'?"),
    ("servr", "unknown key; did you mean 'server'?"),
    ("admin", "unknown key (known: server, storage, state, upstream, providers, models, plugins, logging, auth, "
              "limits, credits, payments, usage, metrics, tracing, privacy, dashboard)"),   # nothing ever read `admin:`
    ("plugin_config", "unknown key; did you mean 'plugins'?"),   # gone: plugins declare sections
])
def test_an_unknown_top_level_key_is_an_error_with_a_hint(key: str, hint: str) -> None:
    [problem] = problems({**ECHO, key: {}}, [])
    assert problem.startswith(f"{key}: {hint}"), problem


def test_a_disabled_built_ins_section_is_still_checked_and_then_unused() -> None:
    bad = {"dodopayments": {"webhook_secrets": ["nope"], "products": {}}}
    found = problems({**ECHO, "plugins": {"disable": ["payments"]}, "payments": bad}, [])
    assert any(p.startswith("payments.dodopayments.webhook_secrets[0]: ") for p in found), found
    assert problems({**ECHO, "plugins": {"disable": ["payments"]}, "payments": {"stripe": {}}}, []) == [
        "payments.stripe: unknown key (known: dodopayments)"]
    good = {"dodopayments": {"webhook_secrets": ["whsec_" + base64.b64encode(b"s" * 24).decode()],
                             "products": {"prod_1": {"credit_usd": 10}}}}
    app = build_app(parse_config({**ECHO, "plugins": {"disable": ["payments"]}, "payments": good}))
    assert PAYMENTS not in app  # accepted, and unused: the plugin is off
    assert "/webhooks/dodopayments" not in {r.canonical for r in app.router.resources()}
    assert PAYMENTS in build_app(parse_config({**ECHO, "payments": good}))


def test_sections_are_declared_once() -> None:
    class Twin:
        @hookimpl
        def nexgate_config_sections(self) -> list[ConfigSection[Any]]:
            return [ConfigSection("limits", parse_quota, (), "Mine too.")]

    with pytest.raises(PluginError, match="'limits' is declared twice"):
        build_app(parse_config(ECHO), extra_plugins=[Twin()])

    class Squatter:
        @hookimpl
        def nexgate_config_sections(self) -> list[ConfigSection[Any]]:
            return [ConfigSection("server", parse_quota, (), "The core's.")]

    with pytest.raises(PluginError, match="'server', which is the core's"):
        build_app(parse_config(ECHO), extra_plugins=[Squatter()])


def test_a_parser_that_crashes_names_its_plugin() -> None:
    def broken(r: Any, section: dict[str, Any], config: Any) -> None:
        raise KeyError("oops")

    class Broken:
        @hookimpl
        def nexgate_config_sections(self) -> list[ConfigSection[Any]]:
            return [ConfigSection("broken", broken, (), "Crashes.")]

    with pytest.raises(PluginError, match=r"plugin '.*Broken.*': parsing the config section 'broken' failed"):
        build_app(parse_config(ECHO), extra_plugins=[Broken()])


def test_an_unparsed_config_says_so_instead_of_handing_out_defaults() -> None:
    with pytest.raises(LookupError, match="'quota' is not parsed"):
        parse_config(ECHO).section(QUOTA_SECTION)


# ------------------------------------------------------------ the example


def declared_sections() -> list[ConfigSection[Any]]:
    """The core's sections and every built-in's (disabled or not, all are declared)."""
    config = parse_config({}, env={})
    resolved = configure(config, build_plugin_manager(config), [])
    builtins = [s for impl in build_plugin_manager(config).hook.nexgate_config_sections.get_hookimpls()
                for s in impl.function()]
    assert set(resolved.settings) == {s.name for s in builtins}
    return [*CORE_SECTIONS, *builtins]


def test_the_example_config_shows_every_section_and_key() -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    sections = declared_sections()
    assert {s.name for s in sections} >= {"server", "storage", "state", "upstream", "providers", "models",
                                          "plugins", "auth", "limits", "credits", "usage", "privacy", "payments"}
    missing = []
    for section in sections:
        if section.name not in example:
            missing.append(section.name)
            continue
        shown = example[section.name] or {}
        if section.entries:  # providers, models: each key shown by at least one entry
            present = {key for entry in shown.values() for key in (entry or {})}
        else:
            present = set(shown)
        missing += [f"{section.name}.{key}" for key in section.keys if key not in present]
    shown_prices = {key for model in example["models"].values() for key in (model.get("price") or {})}
    missing += [f"models.*.price.{key}" for key in PRICE_KEYS if key not in shown_prices]
    assert missing == [], f"config/nexgate.yaml does not show: {', '.join(missing)}"


def test_the_example_config_is_valid_without_any_secret() -> None:
    config = load_config(EXAMPLE, env={})
    build_app(config)
    assert set(config.models) >= {"gpt-4o-mini", "claude-sonnet"}


# ------------------------------------------------------ the example plugin


def example_plugin() -> Any:
    spec = importlib.util.spec_from_file_location("max_messages_example", ROOT / "examples/plugins/max_messages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_example_plugin_reads_its_limit_from_its_section(upstream: FakeUpstream, start_gateway) -> None:
    plugin = example_plugin()
    gw = await start_gateway(gateway_config(upstream, max_messages={"limit": 2}), plugins=[plugin])
    client = openai.AsyncOpenAI(base_url=gw.openai_base, api_key=gw.api_key, max_retries=0)
    await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}] * 2)
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}] * 3)
    assert err.value.body["code"] == "too_many_messages"
    assert err.value.body["message"] == "At most 2 messages per request."
    assert len(upstream.received) == 1
    assert problems({**ECHO, "max_messages": {"limit": 0, "max": 3}}, [example_plugin()]) == [
        "max_messages.max: unknown key (known: limit)",
        "max_messages.limit: must be greater than 0",
    ]
