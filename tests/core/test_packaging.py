"""The wheel ships every package: each directory with an ``__init__.py`` is listed in pyproject.toml.

setuptools installs only the packages named in ``[tool.setuptools] packages`` (the built-ins'
directory ``plugins/`` is installed as ``nexgate_plugins``); a subpackage missing there works in an
editable install and breaks a real one.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {"nexgate_proxy": ROOT / "nexgate_proxy", "nexgate_plugins": ROOT / "plugins"}


def test_every_package_directory_is_listed_in_pyproject() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for name, directory in PACKAGE_DIRS.items():
        for init in directory.rglob("__init__.py"):
            relative = init.parent.relative_to(directory)
            found.add(".".join((name, *relative.parts)))
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == set(), "these listed packages do not exist"
