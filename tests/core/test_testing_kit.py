"""The test kit as a plugin author meets it: a project of its own, only `nexgate_proxy.testing`, a real pytest run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import nexgate_proxy.testing as kit

ROOT = Path(__file__).resolve().parents[2]

# A project that already has fixtures with the names projects pick: the kit's must not clash with them.
OWN_CONFTEST = '''
import pytest

@pytest.fixture
def upstream():
    return "my upstream"

@pytest.fixture
def gateway():
    return "my gateway"

@pytest.fixture
def backend():
    return "my backend"
'''

OWN_NAMES_TEST = '''
async def test_own_fixtures_and_the_kits_live_side_by_side(upstream, gateway, backend, nexgate_gateway,
                                                           nexgate_upstream):
    assert (upstream, gateway, backend) == ("my upstream", "my gateway", "my backend")
    reply = await nexgate_gateway.openai_client().chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello from upstream"
    assert [r.path for r in nexgate_upstream.received] == ["/v1/chat/completions"]
'''


def documented_example() -> dict[str, str]:
    """The fenced blocks of "Testing your plugin" in docs/plugins.md whose first line names their file."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text.split("\n## Testing your plugin\n", 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"^```\w*\n(.*?)^```", section, re.S | re.M):
        named = re.fullmatch(r"# ([\w.-]+)", block.partition("\n")[0].strip())
        if named:
            files[named.group(1)] = block
    return files


def outside_env() -> dict[str, str]:
    """This environment (services, CI flags) without anything that would put this repo on the path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_PLUGINS")}


def outcome(stdout: str) -> dict[str, int]:
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", stdout)}


def test_the_documented_example_passes_in_a_project_of_its_own(tmp_path: Path) -> None:
    files = documented_example()
    assert set(files) == {"pyproject.toml", "tag_team.py", "test_tag_team.py"}
    assert not any("tests." in text for text in files.values()), "the example must not import NexGate's own tests"
    for name, text in {**files, "conftest.py": OWN_CONFTEST, "test_own_names.py": OWN_NAMES_TEST}.items():
        (tmp_path / name).write_text(text)
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs"], cwd=tmp_path,
                         env=outside_env(), capture_output=True, text=True, timeout=240)
    summary = outcome(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0, run.stdout + run.stderr
    # Two tests, one per store backend, and the side-by-side one (PostgreSQL skips only outside CI).
    assert summary.get("passed", 0) + summary.get("skipped", 0) == 5, run.stdout
    assert "failed" not in summary and "error" not in summary and "errors" not in summary


def test_loading_the_kit_is_cheap_and_survives_missing_test_extras(tmp_path: Path) -> None:
    (tmp_path / "test_plain.py").write_text(textwrap.dedent('''
        def test_a_sync_fixture_works(nexgate_backend):
            assert nexgate_backend in ("sqlite", "postgres")

        def test_an_async_fixture_says_what_to_install(nexgate_upstream):
            pass
    '''))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    # pytest-asyncio, the SDK and the drivers absent: the plugin still loads, and loads none of the gateway.
    script = textwrap.dedent('''
        import sys

        class Absent:  # as if these were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pytest_asyncio", "openai", "anthropic", "asyncpg"):
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, Absent())
        import pytest
        import nexgate_proxy.testing.plugin
        heavy = sorted(m for m in ("nexgate_proxy.app", "nexgate_proxy.testing.gateway", "nexgate_proxy.store",
                                   "nexgate_plugins", "yaml", "redis", "prometheus_client") if m in sys.modules)
        print("heavy:", heavy)
        sys.exit(pytest.main(["-p", "no:cacheprovider", "-p", "no:asyncio", "-q", "-rE", "test_plain.py"]))
    ''')
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=outside_env(),
                         capture_output=True, text=True, timeout=120)
    assert "heavy: []" in run.stdout, run.stdout + run.stderr
    assert outcome(run.stdout.strip().splitlines()[-1]) == {"passed": 2, "error": 1}, run.stdout + run.stderr
    assert 'pip install "nexgate[test]"' in run.stdout


def test_every_exported_name_loads() -> None:
    assert sorted(kit.__all__) == sorted(kit._MODULE_OF)
    for name in kit.__all__:
        assert getattr(kit, name) is not None, name
