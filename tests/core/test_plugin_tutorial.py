"""docs/plugins.md's tutorial, followed literally in a fresh virtualenv: its files, its commands, its output.

The machine is offline, so two things differ from a reader's run, both said here: the new virtualenv
sees this one's packages (NexGate and its test extra, as `pip install "nexgate[test]"` would have
installed them) through a .pth file, and `pip install` gets `--no-deps --no-build-isolation` (the
dependencies are there; build isolation would download setuptools).
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from pathlib import Path

from nexgate_proxy.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "plugins.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def tutorial() -> str:
    return DOCS.read_text().split("\n## Tutorial: ", 1)[1].split("\n## ", 1)[0]


def tutorial_script(port: int) -> str:
    """The tutorial as one bash script: each named file block written, each sh block run, in order."""
    lines = ["set -euo pipefail"]
    for lang, block in FENCE.findall(tutorial()):
        named = re.fullmatch(r"# ([\w.-]+)", block.partition("\n")[0].strip())
        if lang == "sh":
            lines.append(block.replace("pip install ", "pip install --no-deps --no-build-isolation "))
        elif named:
            lines.append(f"cat > {named.group(1)} <<'TUTORIAL_EOF'\n{block}TUTORIAL_EOF")
    return "\n".join(lines).replace("8080", str(port))


def fresh_virtualenv(path: Path) -> dict[str, str]:
    """A new virtualenv that sees this one's packages; the environment that puts it first on PATH."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    (new_site,) = path.glob("lib/python*/site-packages")
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
    # addsitedir, not a bare path: it also runs this virtualenv's .pth files (NexGate's editable install).
    (new_site / "outer_venv.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
    # The console scripts pip would have made when installing NexGate, pip and pytest there.
    for name, module in {"nexgate": "nexgate_proxy.cli", "pip": "pip", "pytest": "pytest"}.items():
        script = path / "bin" / name
        script.write_text(f"#!/bin/sh\nexec {path / 'bin' / 'python'} -m {module} \"$@\"\n")
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_PLUGINS", "NEXGATE_CONFIG", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{path / 'bin'}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(path)}


def test_the_tutorial_files_and_steps_are_all_there() -> None:
    names = [re.fullmatch(r"# ([\w.-]+)", block.partition("\n")[0].strip()) for _, block in FENCE.findall(tutorial())]
    assert [m.group(1) for m in names if m] == ["max_messages.py", "pyproject.toml", "test_max_messages.py",
                                                "nexgate.yaml", "try_it.py"]
    script = tutorial_script(1234)
    for step in ("mkdir max-messages && cd max-messages", "pip install --no-deps --no-build-isolation -e",
                 "pytest -q", "nexgate plugins list", "nexgate config check nexgate.yaml", "nexgate db migrate",
                 "nexgate serve --port 1234 &", "python try_it.py"):
        assert step in script


def test_the_tutorial_works_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    env = fresh_virtualenv(tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run(["bash", "-c", tutorial_script(free_port())], cwd=work, env=env,
                         capture_output=True, text=True, timeout=180)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert (work / "max-messages" / "max_messages.py").is_file()
    # The plugin's own test passed...
    assert re.search(r"^1 passed", out, re.M), out
    # ... `nexgate plugins list` saw the installed package through its entry point ...
    listed = next(line for line in out.splitlines() if re.match(r"\d+\s+max_messages\s", line))
    assert "entry point" in listed and "nexgate-max-messages 0.1.0: max_messages" in listed
    assert listed.split()[-3:] == ["admit,", "config_sections,", "register_routes"]
    # ... the config check knew its section, and the gateway answered and refused as the docs say.
    assert "nexgate.yaml: ok (1 providers, 1 models)" in out
    assert out.rstrip().splitlines()[-1] == "refused: too_many_messages"
    assert "hi" in out.rstrip().splitlines()[-2]
