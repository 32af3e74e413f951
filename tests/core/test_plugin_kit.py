"""What a plugin author meets besides the hooks: load-time checks, `nexgate plugins list`, isolation, versions."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from nexgate_proxy import GatewayError, hookimpl, hookspecs
from nexgate_proxy.app import build_app
from nexgate_proxy.appkeys import CHAIN
from nexgate_proxy.config import parse_config
from nexgate_proxy.plugins import PluginError
from nexgate_proxy.testing import FakeUpstream, RecordingPlugin, gateway_config
from tests.cli_runner import Cli

HI = [{"role": "user", "content": "a secret prompt"}]


def _build(upstream: FakeUpstream, *plugins: object) -> None:
    build_app(parse_config(gateway_config(upstream)), extra_plugins=plugins)


# ------------------------------------------------------------ load-time checks


class Misspelt:
    @hookimpl
    def nexgate_admitt(self, ctx):
        pass


class WrongArgument:
    @hookimpl
    def nexgate_record(self, record, context):
        pass


class Unmarked:
    def nexgate_admit(self, ctx):
        pass


def test_a_misspelt_hook_names_the_plugin_the_hook_and_the_fix(upstream: FakeUpstream) -> None:
    with pytest.raises(PluginError) as err:
        _build(upstream, Misspelt())
    assert str(err.value).startswith("plugin 'Misspelt@")
    assert "nexgate_admitt is not a NexGate hook: did you mean nexgate_admit?" in str(err.value)


def test_an_argument_the_hook_does_not_pass_names_what_it_passes(upstream: FakeUpstream) -> None:
    with pytest.raises(PluginError) as err:
        _build(upstream, WrongArgument())
    assert ("nexgate_record takes 'context', which the hook does not pass: it passes (record, app); "
            "rename the argument or drop it") in str(err.value)


def test_a_hook_without_hookimpl_is_refused_not_ignored(upstream: FakeUpstream) -> None:
    with pytest.raises(PluginError, match=r"nexgate_admit is not marked with @hookimpl.*decorate it"):
        _build(upstream, Unmarked())


@pytest.mark.parametrize("command", ["config check", "serve"])
def test_config_check_and_serve_fail_on_a_misspelt_hook_in_the_plugins_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture, command: str) -> None:
    plugins = tmp_path / "my-plugins"
    plugins.mkdir()
    (plugins / "typo.py").write_text("from nexgate_proxy import hookimpl\n\n@hookimpl\n"
                                     "def nexgate_settel(ctx):\n    pass\n")
    config = tmp_path / "nexgate.yaml"
    config.write_text(f"storage: {{url: 'sqlite:///{tmp_path}/n.db'}}\nproviders: {{echo: {{type: echo}}}}\n"
                      f"models: {{demo: {{route: [{{provider: echo, model: echo}}], free: true}}}}\n"
                      f"plugins: {{directory: {plugins}}}\n")
    from nexgate_proxy import cli

    argv = ["config", "check", str(config)] if command == "config check" else ["serve", "--config", str(config),
                                                                                "--port", "0"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    problem = (f"plugin problem: plugin 'my-plugins/typo.py' ({plugins / 'typo.py'}): "
               "nexgate_settel is not a NexGate hook: did you mean nexgate_settle?")
    assert err.strip() == (f"{config}: {problem}" if command == "config check" else problem)


# ------------------------------------------------------------------ versions


def test_the_hook_version_is_major_minor() -> None:
    major, minor = hookspecs.HOOKS_VERSION.split(".")
    assert major.isdigit() and minor.isdigit()


def _needing(version: str) -> object:
    class Needs:
        NEXGATE_HOOKS = version

        @hookimpl
        def nexgate_admit(self):
            pass

    return Needs()


def test_a_plugin_loads_on_the_version_it_needs_and_later_minors(upstream: FakeUpstream,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hookspecs, "HOOKS_VERSION", "1.3")
    _build(upstream, _needing("1.0"), _needing("1.3"))
    with pytest.raises(PluginError) as err:
        _build(upstream, _needing("1.4"))
    assert "it needs hooks version 1.4 (NEXGATE_HOOKS), this NexGate has 1.3" in str(err.value)
    with pytest.raises(PluginError, match="needs hooks version 2.0"):
        _build(upstream, _needing("2.0"))
    with pytest.raises(PluginError, match="'latest' is not a MAJOR.MINOR version"):
        _build(upstream, _needing("latest"))


# ------------------------------------------------------------- plugins list


def _fake_distribution(site: Path) -> None:
    """An installed distribution with a `nexgate` entry point, as pip leaves it (a .dist-info directory)."""
    (site / "greeter_plugin.py").write_text(textwrap.dedent('''
        from nexgate_proxy import hookimpl

        NEXGATE_HOOKS = "1.0"

        @hookimpl(tryfirst=True)
        def nexgate_admit(ctx):
            ctx.response_headers["x-greeter"] = "hi"
    '''))
    info = site / "greeter_plugin-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: greeter-plugin\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text("[nexgate]\ngreeter = greeter_plugin\n")


def _nexgate(*argv: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nexgate_proxy.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_plugins_list_shows_every_source_the_order_the_hooks_and_what_is_off(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "tagger.py").write_text("from nexgate_proxy import hookimpl\n\n@hookimpl\n"
                                                "def nexgate_record(record):\n    pass\n")
    (tmp_path / "nexgate.yaml").write_text(textwrap.dedent(f"""
        providers: {{echo: {{type: echo}}}}
        models: {{demo: {{route: [{{provider: echo, model: echo}}], free: true}}}}
        plugins: {{modules: [tests.plugin_module], directory: {tmp_path / 'dir'}, disable: [metrics]}}
    """))
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), root])}
    run = _nexgate("plugins", "list", "--json", "--config", "nexgate.yaml", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["hooks_version"] == hookspecs.HOOKS_VERSION
    assert report["disabled"] == ["nexgate_plugins.metrics"]
    by_name = {p["name"]: p for p in report["plugins"]}
    assert "nexgate_plugins.metrics" not in by_name
    assert by_name["nexgate_plugins.auth"]["source"] == "built-in"
    assert by_name["greeter"] == {"order": by_name["greeter"]["order"], "name": "greeter", "source": "entry point",
                                  "origin": "greeter-plugin 0.3.0: greeter_plugin", "hooks": ["nexgate_admit"],
                                  "requires_hooks": "1.0"}
    assert by_name["tests.plugin_module"]["source"] == "module"
    assert by_name["dir/tagger.py"]["source"] == "directory"
    assert by_name["dir/tagger.py"]["origin"] == str(tmp_path / "dir" / "tagger.py")
    # Registration order: built-ins, entry points, modules, the directory.
    names = [p["name"] for p in report["plugins"]]
    assert names[-3:] == ["greeter", "tests.plugin_module", "dir/tagger.py"]
    assert [p["order"] for p in report["plugins"]] == list(range(1, len(names) + 1))
    # Call order per hook: the tryfirst entry point runs before the built-ins' admit.
    assert report["call_order"]["nexgate_admit"][0] == "greeter"

    human = _nexgate("plugins", "list", "--config", "nexgate.yaml", cwd=tmp_path, env=env)
    assert human.returncode == 0, human.stderr
    assert f"hooks version {hookspecs.HOOKS_VERSION}" in human.stdout
    line = next(text for text in human.stdout.splitlines() if " greeter " in text)
    assert "entry point" in line and "greeter-plugin 0.3.0" in line and line.rstrip().endswith("admit")
    assert "disabled: nexgate_plugins.metrics" in human.stdout

    skipped = _nexgate("plugins", "list", "--json", "--config", "nexgate.yaml", cwd=tmp_path,
                       env={**env, "NEXGATE_LOAD_PLUGINS": "0"})
    assert "greeter" not in [p["name"] for p in json.loads(skipped.stdout)["plugins"]]
    assert json.loads(skipped.stdout)["entrypoints_loaded"] is False


def test_a_broken_entry_point_names_its_distribution(tmp_path: Path) -> None:
    _fake_distribution(tmp_path)
    (tmp_path / "greeter_plugin.py").write_text("raise RuntimeError('half-installed')\n")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root])}
    run = _nexgate("plugins", "list", cwd=tmp_path, env=env)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("plugin problem: entry point 'greeter' (greeter-plugin 0.3.0: greeter_plugin)")
    assert "NEXGATE_LOAD_PLUGINS=0" in run.stderr


async def test_plugins_list_in_process_without_a_config(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEXGATE_CONFIG", raising=False)
    report = await Cli(capsys).json("plugins", "list")
    assert report["config"] is None
    assert [p["name"] for p in report["plugins"]][:1] == ["nexgate_proxy.providers.openai"]


# ----------------------------------------------------------------- isolation


class BrokenAdmit:
    @hookimpl
    def nexgate_admit(self, ctx):
        raise ValueError(f"cannot handle {ctx.body['messages'][0]['content']}")


async def _metric(gw, name: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as resp:
            return "\n".join(line for line in (await resp.text()).splitlines() if line.startswith(name))


async def test_a_request_hook_that_raises_is_a_500_naming_the_plugin(upstream: FakeUpstream, start_gateway,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    recorder = RecordingPlugin()
    broken = BrokenAdmit()
    gw = await start_gateway(gateway_config(upstream), plugins=[broken, recorder])
    name = gw.app[CHAIN].pm.get_name(broken)
    with caplog.at_level(logging.ERROR, logger="nexgate.plugins"):
        with pytest.raises(openai.InternalServerError) as err:
            await gw.openai_client().chat.completions.create(model="gpt-test", messages=HI)
    assert err.value.status_code == 500
    assert err.value.body == {
        "message": f"The gateway's plugin '{name}' failed in nexgate_admit; the request was not sent upstream. "
                   "The gateway's log has the details.",
        "type": "server_error", "param": None, "code": "plugin_error"}
    assert upstream.received == []
    # settle and record ran: the usage row exists, with the failure.
    assert recorder.settled and (recorder.records[-1].status, recorder.records[-1].error_code) == (500, "plugin_error")
    logged = caplog.records[-1]
    assert logged.getMessage().startswith(f"hook nexgate_admit of plugin '{name}' failed on request ")
    assert logged.exc_info or logged.exc_text  # the traceback, for the operator
    assert f'nexgate_plugin_failures_total{{hook="nexgate_admit",plugin="{name}"}} 1.0' in \
        await _metric(gw, "nexgate_plugin_failures_total")


async def test_the_traceback_in_the_log_carries_no_content(upstream: FakeUpstream, start_gateway,
                                                           tmp_path: Path) -> None:
    from nexgate_proxy import logscrub

    path = tmp_path / "gateway.log"
    handler = logging.FileHandler(path)
    logging.getLogger().addHandler(handler)
    try:
        logscrub.install()  # as `nexgate serve` does once logging is configured
        gw = await start_gateway(gateway_config(upstream), plugins=[BrokenAdmit()])
        with pytest.raises(openai.InternalServerError):
            await gw.openai_client().chat.completions.create(model="gpt-test", messages=HI)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    text = path.read_text()
    assert "Traceback" in text and "ValueError" in text and "nexgate_admit" in text
    assert "a secret prompt" not in text


async def test_on_messages_the_plugin_error_is_anthropic_shaped(upstream: FakeUpstream, start_gateway) -> None:
    class BrokenRoute:
        @hookimpl(tryfirst=True)
        async def nexgate_route(self, ctx):
            raise KeyError("tenant")

    gw = await start_gateway(gateway_config(upstream), plugins=[BrokenRoute()])
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as err:
        await client.messages.create(model="claude-test", max_tokens=10, messages=HI)
    body = err.value.body
    assert body["type"] == "error"
    assert body["error"]["code"] == "plugin_error" and "BrokenRoute" in body["error"]["message"]
    assert "nexgate_route" in body["error"]["message"]


async def test_a_failing_authenticate_is_named_on_the_models_list_too(upstream: FakeUpstream, start_gateway) -> None:
    class BrokenAuth:
        @hookimpl(tryfirst=True)
        def nexgate_authenticate(self, ctx):
            raise RuntimeError("boom")

    gw = await start_gateway(gateway_config(upstream), plugins=[BrokenAuth()])
    with pytest.raises(openai.InternalServerError) as err:
        await gw.openai_client().models.list()
    assert err.value.body["code"] == "plugin_error" and "nexgate_authenticate" in err.value.body["message"]


async def test_a_gateway_error_from_a_plugin_is_passed_on_untouched(upstream: FakeUpstream, start_gateway) -> None:
    class Refuses:
        @hookimpl
        def nexgate_reserve(self, ctx):
            raise GatewayError(402, "Top up first.", code="insufficient_credits")

    gw = await start_gateway(gateway_config(upstream), plugins=[Refuses()])
    with pytest.raises(openai.APIStatusError) as err:
        await gw.openai_client().chat.completions.create(model="gpt-test", messages=HI)
    assert (err.value.status_code, err.value.body["code"]) == (402, "insufficient_credits")


async def test_always_run_phases_log_and_count_and_the_answer_and_the_row_survive(
        upstream: FakeUpstream, start_gateway, caplog: pytest.LogCaptureFixture) -> None:
    class Flaky:
        @hookimpl(tryfirst=True)
        async def nexgate_settle(self, ctx):
            raise RuntimeError("ledger down")

        @hookimpl(tryfirst=True)
        def nexgate_record(self, record):
            raise ConnectionError("sink down")

    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[Flaky(), recorder])
    with caplog.at_level(logging.ERROR, logger="nexgate.plugins"):
        for _ in range(3):
            reply = await gw.openai_client().chat.completions.create(model="gpt-test", messages=HI)
            assert reply.choices[0].message.content == "Hello from upstream"
    assert len(recorder.records) == 3 and len(recorder.settled) == 3
    messages = [r for r in caplog.records if r.name == "nexgate.plugins"]
    assert len(messages) == 6
    assert sum(bool(r.exc_info or r.exc_text) for r in messages) == 2  # one traceback per hook and minute
    text = await _metric(gw, "nexgate_plugin_failures_total")
    assert 'hook="nexgate_settle",plugin="Flaky@' in text and 'hook="nexgate_record",plugin="Flaky@' in text
    assert all(line.endswith(" 3.0") for line in text.splitlines())


# ------------------------------------------------------------ example plugins

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "plugins"
PACKAGES = sorted(path.parent for path in EXAMPLES.glob("*/pyproject.toml"))


def test_every_example_is_linked_from_the_guide_and_every_link_resolves() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    links = re.findall(r"\]\((\.\./[^)#\s]+)\)", docs)
    for link in links:
        assert (ROOT / "docs" / link).resolve().exists(), f"docs/plugins.md links to {link}, which does not exist"
    linked = {(ROOT / "docs" / link).resolve() for link in links}
    examples = [*PACKAGES, *EXAMPLES.glob("*.py")]
    assert len(PACKAGES) >= 4
    assert [path.relative_to(ROOT) for path in examples if path.resolve() not in linked] == []


@pytest.mark.parametrize("package", PACKAGES, ids=lambda path: path.name)
def test_every_example_is_an_installable_plugin_package_with_tests(package: Path) -> None:
    project = tomllib.loads((package / "pyproject.toml").read_text())
    entry_points = project["project"]["entry-points"]["nexgate"]
    assert list(entry_points) == [package.name]
    module = entry_points[package.name]
    assert (package / "src" / module / "__init__.py").is_file()
    assert "nexgate" in project["project"]["dependencies"]
    assert (package / "README.md").is_file()
    assert list((package / "tests").glob("test_*.py")), f"{package.name} has no tests"


def test_the_project_test_run_collects_the_examples_tests() -> None:
    pytest_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "examples/plugins" in pytest_config["testpaths"]
