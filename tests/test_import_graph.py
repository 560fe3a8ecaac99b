"""The packages' import graph, read from the source: no cycles, and dependencies point one way
(launch → trainer → model, data → common), as DESIGN.md says. Imports under ``if TYPE_CHECKING:``
are not run, so they are not edges; imports inside functions are (deferring one hides a cycle, it
does not remove it)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "data", "model", "trainer", "launch")
# what each package may import, besides itself
ALLOWED = {"common": set(), "model": {"common"}, "data": {"common"},
           "trainer": {"common", "data", "model"}, "launch": {"common", "data", "model", "trainer"}}
# cycles still to break, each named so that breaking it must update this list too
KNOWN_CYCLES: list[list[str]] = []


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    names = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in mods.items():
        for name in imported_names(path):
            target = owner(name)
            # a package's own submodules importing it (its base classes) is how packages are built
            if target and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(graph).union(*graph.values())):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycles_beyond_the_known_ones():
    assert cycles(import_graph()) == KNOWN_CYCLES


def test_dependencies_point_one_way():
    wrong = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                   for target in targets
                   if target.split(".")[0] != module.split(".")[0]
                   and target.split(".")[0] not in ALLOWED[module.split(".")[0]])
    assert wrong == []


def test_model_has_no_distributed_code():
    offenders = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "model").rglob("*.py")
                       if any(name.startswith("torch.distributed") for name in imported_names(path)))
    assert offenders == []


def test_the_checker_finds_cycles_and_deferred_imports(tmp_path):
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import launch.cli\n"
                      "def f():\n    from trainer.loop import Trainer\n")
    assert imported_names(source) == ["typing", "typing.TYPE_CHECKING", "trainer.loop", "trainer.loop.Trainer"]
