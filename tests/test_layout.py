"""The package's layout holds: no import cycle between modules, and no stage imports a later one.

The graph is built from the source (every ``import`` / ``from ... import`` of a cycleqd
module, at any depth of a function, except under ``if TYPE_CHECKING:``), so a lazy import
inside a function counts too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cycleqd

PACKAGE = Path(cycleqd.__file__).parent

#: The pipeline's stages, in data-path order: a module may import its own stage and earlier ones.
STAGES = [
    ("core", ["cycleqd.config", "cycleqd.registry", "cycleqd.recent", "cycleqd.atomic", "cycleqd.bounded"]),
    ("sandbox", ["cycleqd.sandbox"]),
    ("model", ["cycleqd.model"]),
    ("search", ["cycleqd.search"]),
    ("engine", ["cycleqd.engine"]),
    ("mini", ["cycleqd.mini"]),
    ("tasks", ["cycleqd.tasks"]),
    ("runs", ["cycleqd.runs"]),
    ("evolve", ["cycleqd.evolve"]),
    ("studies", ["cycleqd.studies"]),
    ("views", ["cycleqd.views"]),
    ("cli", ["cycleqd.cli"]),
]
MAX_FLAT = 8  # top-level modules besides the stage folders


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imported(module: str, path: Path) -> set[str]:
    """Every cycleqd module name ``module`` imports (names of ``from x import y`` too, as x.y)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
               for stmt in node.body for n in ast.walk(stmt)}
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here[: len(here) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] == "cycleqd"}


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for m, f in mods.items():
        targets = {resolve(n) for n in _imported(m, f)} - {None, m}
        if f.name == "__init__.py":  # a package re-exporting its own modules is not an edge
            targets = {t for t in targets if not t.startswith(m + ".")}
        graph[m] = targets
    return graph


def _stage(module: str) -> int:
    for rank, (_, prefixes) in enumerate(STAGES):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no stage: add it to STAGES in {__file__}")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out = set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = len(index)
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph[w]))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


def test_no_import_cycle_between_modules():
    assert _cycles(_graph()) == []


def test_no_stage_imports_a_later_stage():
    wrong = [f"{m} ({STAGES[_stage(m)][0]}) imports {t} ({STAGES[_stage(t)][0]})"
             for m, targets in sorted(_graph().items()) for t in sorted(targets) if _stage(t) > _stage(m)]
    assert wrong == []


def test_few_flat_modules():
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(flat) <= MAX_FLAT, flat


@pytest.mark.parametrize("source, found", [
    ("import cycleqd.views.plots\n", True),
    ("def f():\n    from cycleqd.views import plots\n", True),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cycleqd.views.plots import PlotObserver\n", False),
])
def test_the_graph_sees_lazy_imports_and_skips_type_checking_ones(tmp_path, source, found):
    f = tmp_path / "m.py"
    f.write_text(source)
    assert ("cycleqd.views.plots" in _imported("cycleqd.runs.m", f) or
            "cycleqd.views" in _imported("cycleqd.runs.m", f)) is found


def test_a_cycle_and_a_backward_import_are_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _stage("cycleqd.runs.store") < _stage("cycleqd.views.plots")
