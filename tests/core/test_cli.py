"""The `nexgate` command, run for real in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nexgate_proxy.testing import free_port, is_listening

GOOD = """
    server: {port: 8080}
    providers:
      openai:
        type: openai
        base_url: https://api.openai.com/v1
        api_key: ${OPENAI_API_KEY:-sk-placeholder}
      echo: {type: echo}
    models:
      gpt-4o-mini:
        route: [{provider: openai, model: gpt-4o-mini}]
        fallbacks: [local]
        price: {input: 0.15, output: 0.6}
      local:
        route: [{provider: echo, model: echo-1}]
        free: true
"""

BAD = """
    servr: {port: 8080}
    server:
      port: {port}
      workers: 0
    providers:
      openai: {{type: openai, base_url: "api.openai.com"}}
    models:
      gpt:
        route: [{{provider: openia, model: gpt-4o-mini}}]
        fallbacks: [missing]
        timeouts: {{total: -5}}
        price: {{input: 0.15}}
"""

BAD_PROBLEMS = [
    "servr: unknown key; did you mean 'server'?",
    "server.workers: must be greater than 0",
    "providers.openai.base_url: must be an http(s) URL, got 'api.openai.com'",
    "models.gpt.route[0].provider: unknown provider 'openia' (did you mean 'openai'?)",
    "models.gpt.fallbacks[0]: unknown model 'missing' (fallbacks name other models of this table)",
    "models.gpt.timeouts.total: must be greater than 0",
    "models.gpt.price.output: required: USD per 1M tokens, e.g. 0.15",
    # The credits plugin's check, in the same pass as the core's.
    "models.gpt.price: required while credits are enabled (USD per 1M tokens, e.g. {input: 0.15, output: 0.60}), "
    "or set free: true",
]


def nexgate(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run ``nexgate ARGS`` with the interpreter running the tests (works in any venv)."""
    base = {k: v for k, v in os.environ.items() if k != "NEXGATE_CONFIG"}
    return subprocess.run([sys.executable, "-m", "nexgate_proxy.cli", *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ------------------------------------------------------------ config check


def test_config_check_ok(tmp_path: Path) -> None:
    path = write(tmp_path / "nexgate.yaml", GOOD)
    result = nexgate("config", "check", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok (2 providers, 2 models)"


def test_installed_console_script_checks_a_config(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("nexgate")
    if not script.exists():
        pytest.skip("the nexgate console script is not installed next to this interpreter")
    path = write(tmp_path / "nexgate.yaml", GOOD)
    result = subprocess.run([str(script), "config", "check", str(path)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": ok (2 providers, 2 models)")


def test_config_check_prints_every_problem_with_its_key_path(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", BAD.format(port=8080))
    result = nexgate("config", "check", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}: {len(BAD_PROBLEMS)} problem(s)"
    assert sorted(lines[1:]) == sorted(f"  - {p}" for p in BAD_PROBLEMS)


def test_config_check_reports_an_unknown_provider_type(tmp_path: Path) -> None:
    path = write(tmp_path / "nexgate.yaml", """
        providers:
          local: {type: olama, base_url: "http://localhost:11434/v1"}
        models:
          llama: {route: [{provider: local, model: llama3}]}
    """)
    result = nexgate("config", "check", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert "providers.local.type: unknown provider type 'olama' (known: " in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.yaml", "providers:\n  echo: {type: echo\nmodels: {}\n")
    result = nexgate("config", "check", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert "line 3, column 7: not valid YAML" in result.stderr
    result = nexgate("config", "check", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "nope.yaml: 1 problem(s)" in result.stderr and "cannot read the file" in result.stderr


# ------------------------------------------------------------------ serve


def test_serve_without_a_config_says_how_to_give_one(tmp_path: Path) -> None:
    result = nexgate("serve", cwd=tmp_path, timeout=20)
    assert result.returncode == 1
    assert "no config file" in result.stderr
    for hint in ("--config", "NEXGATE_CONFIG", "nexgate serve --demo"):
        assert hint in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_config_refuses_to_start(tmp_path: Path) -> None:
    port = free_port()
    path = write(tmp_path / "bad.yaml", BAD.format(port=port))
    result = nexgate("serve", "--config", str(path), cwd=tmp_path, timeout=20)
    assert result.returncode == 1
    for problem in BAD_PROBLEMS:
        assert f"  - {problem}" in result.stderr
    assert "listening" not in result.stderr and "Traceback" not in result.stderr
    assert not is_listening(port)


def test_serve_reads_nexgate_config_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path / "elsewhere.yaml", "models: {m: {route: [{provider: nowhere}], free: true}}\n")
    result = nexgate("serve", cwd=tmp_path, env={"NEXGATE_CONFIG": str(path)}, timeout=20)
    assert result.returncode == 1
    assert f"{path}: 1 problem(s)" in result.stderr
    assert "models.m.route[0].provider: unknown provider 'nowhere' (known: none)" in result.stderr


@pytest.mark.parametrize("args, message", [
    (("--port", "70000"), "argument --port: '70000' is not a port number (0-65535)"),
    (("--port", "http"), "argument --port: 'http' is not a port number (0-65535)"),
    (("--workers", "0"), "argument --workers: '0' is not a positive number of worker processes"),
])
def test_serve_rejects_bad_arguments(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = nexgate("serve", "--demo", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_serve_on_a_port_in_use_says_so(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = nexgate("serve", "--demo", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 1
    assert "nexgate: cannot listen:" in result.stderr and "address already in use" in result.stderr
    assert "Traceback" not in result.stderr


TEAM_PLUGIN = """
    from nexgate_proxy import hookimpl
    from nexgate_proxy.clikit import add_command, emit, option_parents


    async def _roster(env, store):
        users = await store.list_users(1000, 0)
        emit(env, {"team": env.args.team, "users": len(users)}, f"{env.args.team}: {len(users)} user(s)")
        return 0


    @hookimpl
    def nexgate_cli_commands(subparsers):
        common, _ = option_parents("")
        p = add_command(subparsers, "roster", "count the users of the store", _roster, common)
        p.add_argument("--team", required=True)
"""


def test_a_third_party_plugin_adds_a_command_with_the_hook_the_built_ins_use(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    write(plugins / "team.py", TEAM_PLUGIN)
    config = write(tmp_path / "nexgate.yaml", f"""
        storage: {{url: "sqlite:///{tmp_path}/n.db"}}
        plugins: {{directory: "{plugins}"}}
    """)
    assert nexgate("db", "migrate", "--config", str(config), cwd=tmp_path).returncode == 0
    assert nexgate("users", "create", "--email", "a@example.com", "--config", str(config), cwd=tmp_path).returncode == 0
    listed = nexgate("--help", "--config", str(config), cwd=tmp_path)
    assert "roster" in listed.stdout  # beside the built-ins' commands (users, keys, credits, ...)
    done = nexgate("roster", "--team", "blue", "--config", str(config), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"team": "blue", "users": 1}
    refused = nexgate("roster", "--config", str(config), cwd=tmp_path)  # argparse's own check, one line, exit 2
    assert refused.returncode == 2 and "--team" in refused.stderr and "Traceback" not in refused.stderr
