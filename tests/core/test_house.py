"""The house rules the layout promises, checked on the source (README "Layout", docs/plugins.md).

* the core (``nexgate_proxy``) imports no built-in plugin: it names them only in
  ``DEFAULT_PLUGINS``, as strings;
* a plugin imports no other plugin's private (underscore) names: what plugins share goes
  through hooks and typed app keys, or their public modules;
* no import circles among the modules (every import outside ``TYPE_CHECKING``, lazy ones too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"nexgate_proxy": ROOT / "nexgate_proxy", "nexgate_plugins": ROOT / "plugins"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package)."""
    found = {}
    for package, directory in PACKAGES.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join([package, *parts])] = (path, is_package)
    return found


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) of every import outside ``TYPE_CHECKING``, in functions too: a lazy
    import that closes a loop is a circle kept out of sight, not a way around one."""
    path, is_package = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, list[str], int]] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.extend((alias.name, [], node.lineno) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node)
                names = [alias.name for alias in node.names]
                submodules = [n for n in names if f"{target}.{n}" in MODULES]
                # `from package import submodule` imports the submodule, not the package's own names
                if len(submodules) < len(names):
                    found.append((target, names, node.lineno))
                found.extend((f"{target}.{n}", [], node.lineno) for n in submodules)
            else:
                for field in ("body", "orelse", "finalbody"):
                    inner = getattr(node, field, None)
                    if isinstance(inner, list):
                        visit(inner)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return found


def _plugin_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "nexgate_plugins" and len(parts) > 1 else None


def test_the_core_imports_no_plugin() -> None:
    offenders = []
    for module, (path, _) in MODULES.items():
        if not module.startswith("nexgate_proxy"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{module}:{node.lineno} imports {n}" for n in names if n.startswith("nexgate_plugins")]
    assert offenders == []


def test_no_plugin_imports_another_plugins_private_names() -> None:
    offenders = []
    for module, (path, is_package) in MODULES.items():
        own = _plugin_of(module)
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _resolve(module, is_package, node)
            other = _plugin_of(target)
            if other is None or other == own:
                continue
            private = [a.name for a in node.names if a.name.startswith("_")]
            private += [part for part in target.split(".")[2:] if part.startswith("_")]
            if private:
                offenders.append(f"{module}:{node.lineno} imports {target}: {', '.join(private)}")
    assert offenders == []


def test_no_import_circles() -> None:
    graph = {module: sorted({target for target, _, _ in _imports(module) if target in MODULES} - {module})
             for module in MODULES}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    # A package's __init__ importing its own submodules, which import the package back, is a circle too.
    assert [" -> ".join(cycle) for cycle in cycles] == []
