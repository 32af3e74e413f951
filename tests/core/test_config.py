"""The YAML config: ${ENV} interpolation, validation that reports every problem at once, typed values."""

from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from nexgate_proxy import plugins
from nexgate_proxy.app import build_app
from nexgate_proxy.config import Config, ConfigError, Timeouts, demo_config, load_config, parse_config


def write(tmp_path: Path, text: str, name: str = "nexgate.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(data: Any, env: dict[str, str] | None = None) -> list[str]:
    """Every problem, as `nexgate config check` and `serve` see them: the core's and the plugins' sections."""
    with pytest.raises(ConfigError) as err:
        build_app(parse_config(data, "test.yaml", env=env or {}))
    return err.value.problems


ECHO = {"providers": {"echo": {"type": "echo"}}}
NO_CREDITS = {"credits": {"enabled": False}}
"""For tests of the core's checks: with credits on, every model without a price is one more problem."""


# ------------------------------------------------------------ interpolation


def test_env_values_defaults_and_dollar_literals(tmp_path: Path) -> None:
    path = write(tmp_path, """
        providers:
          openai:
            type: openai
            base_url: ${OPENAI_BASE_URL:-https://api.openai.com/v1}
            api_key: ${OPENAI_API_KEY}
            headers:
              X-Team: "team-${TEAM:-core}"
              X-Empty-Uses-Default: "${EMPTY:-fallback}"
              X-Price: "costs $$5, not ${NOT_EXPANDED:-x}"
              X-Template: "$${OPENAI_API_KEY}"
        models:
          gpt:
            route: [{provider: openai, model: "${UPSTREAM_MODEL:-gpt-4o-mini}"}]
    """)
    env = {"OPENAI_API_KEY": "sk-from-env", "EMPTY": "", "TEAM": "search"}
    config = load_config(path, env=env)
    openai = config.providers["openai"]
    assert openai.api_key == "sk-from-env"
    assert openai.base_url == "https://api.openai.com/v1"  # unset: the default
    assert openai.headers == {
        "X-Team": "team-search",
        "X-Empty-Uses-Default": "fallback",  # ${VAR:-default} also replaces an empty value, as in the shell
        "X-Price": "costs $5, not x",
        "X-Template": "${OPENAI_API_KEY}",  # $$ escapes: never expanded
    }
    assert config.models["gpt"].targets[0].model == "gpt-4o-mini"
    assert config.secrets() == ["sk-from-env"]


def test_process_environment_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXGATE_TEST_KEY", "sk-process-env")
    path = write(tmp_path, """
        providers:
          oa: {type: openai, base_url: "https://api.openai.com/v1", api_key: "${NEXGATE_TEST_KEY}"}
    """)
    assert load_config(path).providers["oa"].api_key == "sk-process-env"


def test_unset_variable_without_default_names_key_path_and_variable() -> None:
    problems = problems_of({
        "providers": {"oa": {"type": "openai", "base_url": "https://api.openai.com/v1",
                             "api_key": "${OPENAI_API_KEY}"}},
        "models": {"gpt": {"route": [{"provider": "oa", "model": "${UPSTREAM_MODEL}"}]}},
        **NO_CREDITS,
    })
    assert problems == [
        "providers.oa.api_key: environment variable OPENAI_API_KEY is not set "
        "(set it, or give a default: ${OPENAI_API_KEY:-value})",
        "models.gpt.route[0].model: environment variable UPSTREAM_MODEL is not set "
        "(set it, or give a default: ${UPSTREAM_MODEL:-value})",
    ]


def test_env_strings_are_coerced_to_numbers_and_booleans() -> None:
    env = {"PORT": "9090", "WORKERS": "4", "ACCESS_LOG": "true", "CONNECT": "2.5", "FREE": "no",
           "PRICE_IN": "0.15"}
    config = parse_config({
        "server": {"port": "${PORT}", "workers": "${WORKERS}", "access_log": "${ACCESS_LOG}"},
        "upstream": {"timeouts": {"connect": "${CONNECT}"}},
        **ECHO,
        "models": {"m": {"route": [{"provider": "echo"}], "free": "${FREE}",
                         "price": {"input": "${PRICE_IN}", "output": "${PRICE_OUT:-0.6}"}}},
    }, env=env)
    assert (config.server.port, config.server.workers, config.server.access_log) == (9090, 4, True)
    assert config.upstream.timeouts.connect == 2.5
    assert config.models["m"].free is False
    assert config.models["m"].price is not None
    assert (config.models["m"].price.input, config.models["m"].price.output) == (Decimal("0.15"), Decimal("0.6"))


def test_env_string_that_is_not_a_number_is_a_problem() -> None:
    problems = problems_of({"server": {"port": "${PORT}", "access_log": "${LOG}"}},
                           env={"PORT": "eighty", "LOG": "maybe"})
    assert problems == ["server.port: expected an integer, got 'eighty'",
                        "server.access_log: expected true or false, got 'maybe'"]


# ------------------------------------------------------------------- YAML


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        server:
          port: 8080
           host: 0.0.0.0
        models: {}
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == ["line 3, column 8: not valid YAML (mapping values are not allowed here)"]
    assert str(path) in str(err.value)


def test_unreadable_files_are_problems_not_tracebacks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "missing.yaml")
    assert err.value.problems == ["cannot read the file: No such file or directory"]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("server:\n  host: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(latin1)
    assert len(err.value.problems) == 1 and "not UTF-8" in err.value.problems[0]


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "# nothing configured yet\n"))
    assert (config.server.host, config.server.port, config.server.workers) == ("127.0.0.1", 8080, 1)
    assert config.providers == {} and config.models == {}


# ------------------------------------------------------------ every problem at once


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, """
        servr:                        # typo of a section
          port: 8080
        server:
          port: 70000
          workers: two
          access_log: 3
        upstream:
          timeouts: {connect: -1}
        providers:
          openai:
            type: openai
            base_url: api.openai.com/v1
            api_ky: sk-typo
          anthropic:
            type: anthropic
        models:
          gpt:
            route: [{provider: opneai, model: gpt-4o-mini}]
            fallbacks: [ghost, gpt]
            timeouts: {idle: 0}
            price: {input: 0.15}
          claude:
            route: [{provider: anthropic, model: claude-3-5-haiku, weight: "heavy"}]
            price: {input: -1, output: "cheap"}
            max_output_tokens: 1.5
    """)
    with pytest.raises(ConfigError) as err:
        plugins.load_config(path)  # as `serve` and `config check` load it: the plugins' sections too
    problems = err.value.problems
    assert sorted(problems) == sorted([
        "servr: unknown key; did you mean 'server'?",
        "server.port: must be a port number between 0 and 65535",
        "server.workers: expected an integer, got 'two'",
        "server.access_log: expected true or false, got 3",
        "upstream.timeouts.connect: must be greater than 0",
        "providers.openai.api_ky: unknown key; did you mean 'api_key'?",
        "providers.openai.base_url: must be an http(s) URL, got 'api.openai.com/v1'",
        "providers.anthropic.base_url: required, e.g. https://api.openai.com/v1",
        "models.gpt.route[0].provider: unknown provider 'opneai' (did you mean 'openai'?)",
        "models.gpt.fallbacks[0]: unknown model 'ghost' (fallbacks name other models of this table)",
        "models.gpt.fallbacks[1]: a model cannot fall back to itself",
        "models.gpt.timeouts.idle: must be greater than 0",
        "models.gpt.price.output: required: USD per 1M tokens, e.g. 0.15",
        "models.claude.route[0].weight: expected an integer, got 'heavy'",
        "models.claude.price.input: must not be negative",
        "models.claude.price.output: expected a number, got 'cheap'",
        "models.claude.max_output_tokens: expected an integer, got 1.5",
        # The plugins' sections in the same pass: credits needs a price for each model.
        "models.gpt.price: required while credits are enabled (USD per 1M tokens, e.g. {input: 0.15, "
        "output: 0.60}), or set free: true",
        "models.claude.price: required while credits are enabled (USD per 1M tokens, e.g. {input: 0.15, "
        "output: 0.60}), or set free: true",
    ])
    rendered = str(err.value)
    assert rendered.startswith(f"{path}: 19 problem(s)\n")
    assert all(f"  - {p}" in rendered for p in problems)


def test_unknown_top_level_key_without_a_close_match_lists_the_known_sections() -> None:
    [problem] = problems_of({"zzz": 1})
    assert problem.startswith("zzz: unknown key (known: server, storage, state, upstream, providers, models")


def test_wrong_shapes_are_problems() -> None:
    problems = problems_of({
        "providers": {"oa": {"type": "openai", "base_url": "http://localhost:1/v1", "headers": {"X-Retries": 3}}},
        "models": {"a": {"route": "oa"}, "b": {"route": [{"provider": "oa"}], "fallbacks": "a"},
                   "c": {"route": [{"provider": "oa"}], "fallbacks": [{"model": "a"}]}},
        "plugins": {"modules": "my_plugin"},
        **NO_CREDITS,
    })
    assert sorted(problems) == sorted([
        "providers.oa.headers.X-Retries: header values must be strings",
        "models.a.route: required: a list of {provider, model, weight} targets",
        "models.b.fallbacks: expected a list, got 'a'",
        "models.c.fallbacks[0]: expected a model name, got a mapping",
        "plugins.modules: expected a list, got 'my_plugin'",
    ])
    assert problems_of({"models": ["gpt"]}) == ["models: expected a mapping, got a list"]


@pytest.mark.parametrize("bad", [".nan", ".inf", "NaN", "Infinity"])
def test_a_price_must_be_a_finite_number(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path, f"""
        providers: {{echo: {{type: echo}}}}
        models:
          m: {{route: [{{provider: echo}}], price: {{input: {bad}, output: 1}}}}
        credits: {{enabled: false}}
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("models.m.price.input: expected a number, got ")


def test_storage_and_state_urls_are_checked() -> None:
    assert problems_of({"storage": {"url": "mysql://db/nexgate"}, "state": {"url": "memcached://x"}}) == [
        "storage.url: must start with one of sqlite://, postgresql://, postgres://, got 'mysql'",
        "state.url: must start with one of memory://, redis://, rediss://, unix://, got 'memcached'",
    ]


# ------------------------------------------------------------------ values


def test_prices_are_exact_decimals(tmp_path: Path) -> None:
    path = write(tmp_path, """
        providers: {echo: {type: echo}}
        models:
          mini:
            route: [{provider: echo}]
            price: {input: 0.15, output: 0.6, cached_input: 0.075}
          big:
            route: [{provider: echo}]
            price: {input: "2.50", output: 10}
    """)
    config = load_config(path)
    mini, big = config.models["mini"].price, config.models["big"].price
    assert mini is not None and big is not None
    assert (mini.input, mini.output, mini.cached_input) == (Decimal("0.15"), Decimal("0.6"), Decimal("0.075"))
    assert all(type(v) is Decimal for v in (mini.input, mini.output, mini.cached_input, big.input, big.output))
    # Exact: three times 0.15 is 0.45, which it is not in binary floating point.
    assert mini.input * 3 == Decimal("0.45") and 0.15 * 3 != 0.45
    assert (big.input, big.output, big.cached_input) == (Decimal("2.50"), Decimal("10"), None)


def test_model_timeouts_inherit_the_upstream_defaults() -> None:
    config = parse_config({
        "upstream": {"timeouts": {"connect": 3, "idle": 60}},
        **ECHO,
        "models": {
            "reasoner": {"route": [{"provider": "echo"}], "timeouts": {"first_byte": 600}},
            "plain": {"route": [{"provider": "echo"}]},
        },
    }, env={})
    assert config.upstream.timeouts == Timeouts(connect=3, first_byte=300, idle=60, total=900)
    assert config.models["reasoner"].timeouts == Timeouts(connect=3, first_byte=600, idle=60, total=900)
    assert config.models["plain"].timeouts == config.upstream.timeouts


def test_a_valid_config_is_frozen_and_typed() -> None:
    config = parse_config({
        "server": {"host": "0.0.0.0", "port": 9000, "grace_period": 5},
        "providers": {"oa": {"type": "openai", "base_url": "https://api.openai.com/v1/", "api_key": "sk-1"}},
        "models": {"gpt": {"route": [{"provider": "oa", "model": "gpt-4o-mini", "weight": 2},
                                     {"provider": "oa", "model": "gpt-4o"}],
                           "fallbacks": ["alt"]},
                   "alt": {"route": [{"provider": "oa"}]}},
    }, env={})
    assert isinstance(config, Config)
    assert config.server.grace_period == 5.0 and isinstance(config.server.grace_period, float)
    assert config.providers["oa"].base_url == "https://api.openai.com/v1"  # trailing slash trimmed
    gpt = config.models["gpt"]
    assert [(t.provider, t.model, t.weight) for t in gpt.targets] == [("oa", "gpt-4o-mini", 2), ("oa", "gpt-4o", 1)]
    assert gpt.fallbacks == ("alt",)
    assert config.models["alt"].targets[0].model == "alt"  # the upstream model defaults to the alias
    assert "sk-1" not in repr(config.providers["oa"])
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


def test_unknown_provider_type_is_found_when_plugins_load() -> None:
    config = parse_config({"providers": {"local": {"type": "olama", "base_url": "http://localhost:11434/v1"}},
                           "models": {"llama": {"route": [{"provider": "local"}], "free": True}}},
                          "test.yaml", env={})
    with pytest.raises(ConfigError) as err:
        build_app(config)
    [problem] = err.value.problems
    assert problem.startswith("providers.local.type: unknown provider type 'olama' (known: ")
    assert all(t in problem for t in ("anthropic", "echo", "openai"))


def test_demo_config_is_valid() -> None:
    config = demo_config()
    assert {"demo", "text-embedding-demo"} <= set(config.models)
    assert {p.type for p in config.providers.values()} == {"echo"}
    build_app(config)
