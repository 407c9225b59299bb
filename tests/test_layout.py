"""The shape of the code: no import cycles among llmkit's modules (function-level imports
included), and modules and functions of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmkit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the llmkit modules it imports anywhere in its body (a parent package that is
    only passed through on the way to a submodule does not count)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [])
            if found:
                return found
    return None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "llmkit.tasks.classify" in graph
    assert "llmkit.config.schema" in graph["llmkit.tasks.classify"]
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


# Each folder (or top-level module) and what it may import: only what ranks below it, and
# itself ("llmkit" is the package's Python API, which the commands are a shell over). The same
# map, with what each part owns, is in CONTRIBUTING.md.
LAYERS = {"llmkit.errors": 0, "llmkit.config": 1, "llmkit.hub": 2, "llmkit.data": 3,
          "llmkit.scoring": 3, "llmkit.tasks": 4, "llmkit.models": 5, "llmkit.inference": 6,
          "llmkit.run": 7, "llmkit": 8, "llmkit.serve": 9, "llmkit.export": 9,
          "llmkit.sweep": 9, "llmkit.cli": 10, "llmkit.__main__": 11}


def layer(module: str) -> str:
    """The entry of LAYERS a module belongs to ("llmkit" is the package's __init__ only)."""
    found = [name for name in LAYERS if module == name or (
        name != "llmkit" and module.startswith(name + "."))]
    assert found, f"{module} is in no layer: add its folder to LAYERS (and CONTRIBUTING.md)"
    return max(found, key=len)


def test_imports_go_down_the_layers() -> None:
    graph = import_graph()
    assert "llmkit.models" in set(map(layer, graph))  # every module is in a layer
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
              if layer(a) != layer(b) and LAYERS[layer(b)] >= LAYERS[layer(a)]]
    assert not upward, upward


def test_modules_and_functions_stay_small() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 300, f"{path.name}: {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                assert length <= 50, f"{path.name}: {node.name} has {length} lines"


def test_the_package_is_folders_that_name_the_parts() -> None:
    top = [p.name for p in PACKAGE.glob("*.py")]
    folders = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    assert len(top) <= 8, top
    assert len(folders) >= 4, folders


def calls(path: Path) -> list[str]:
    """The dotted names of every call in a module (`print`, `typer.echo`, `x.from_pretrained`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            func, parts = node.func, []
            while isinstance(func, ast.Attribute):
                parts.insert(0, func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.insert(0, func.id)
            found.append(".".join(parts))
    return found


def test_one_module_loads_checkpoints() -> None:
    loaders = {module_name(p) for p in PACKAGE.rglob("*.py")
               if any(c.endswith("from_pretrained") for c in calls(p))}
    assert loaders == {"llmkit.models"}


def test_nothing_below_the_commands_prints() -> None:
    """Output reaches the terminal through the reporter the command layer hands down."""
    terminal = ("print", "Console", "typer.echo", "Progress", "rich.print")
    talkers = {module_name(p) for p in PACKAGE.rglob("*.py") if layer(module_name(p)) not in (
        "llmkit.cli", "llmkit.__main__") and set(calls(p)) & set(terminal)}
    assert not talkers, talkers


def test_every_package_is_in_the_wheel() -> None:
    """pyproject.toml lists the packages one by one: a new folder must be added there."""
    tomllib = pytest.importorskip("tomllib")
    settings = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(settings["tool"]["setuptools"]["packages"])
    assert {module_name(p) for p in PACKAGE.rglob("__init__.py")} <= listed
