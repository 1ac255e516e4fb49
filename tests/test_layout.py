"""The package layout: the package order of the README, no import cycles, training never
imports evaluation, a short top level.

Every `import` and `from ... import` counts, inside functions too: a lazy import is still a
dependency a reader has to follow, and a cycle hidden in a function body is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cpe_ray", "actors", "launch")
MAX_TOP_LEVEL_MODULES = 15
# The only modules outside cpe_ray/evaluation/ that may import it: the command line.
# the CLI, and the human judges above evaluation (their report shares its tables and plots)
EVALUATION_IMPORTERS = ("cpe_ray.cli", "cpe_ray.human")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in files and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def package_order() -> list[list[str]]:
    """The README's package order: one list of units per line, lowest first."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- package-order -->")[1].split("<!-- /package-order -->")[0]
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("```")]
    # a line holds unit names, then two or more spaces and a comment
    return [ln.split("  ")[0].split() for ln in lines]


def unit_of(module: str, units: list[str]) -> str | None:
    """The longest unit that is `module` or a package above it; a unit that other units sit
    in (`cpe_ray`) holds only its own `__init__`, so a new package must be placed."""
    parents = {u for u in units if any(v.startswith(u + ".") for v in units)}
    found = [u for u in units
             if module == u or (u not in parents and module.startswith(u + "."))]
    return max(found, key=len) if found else None


def order_violations(graph: dict[str, set[str]], order: list[list[str]]) -> list[str]:
    """Imports that point to a unit on the same or a later line of `order`."""
    line = {u: i for i, units in enumerate(order) for u in units}
    units = list(line)
    out = []
    for module, deps in graph.items():
        src = unit_of(module, units)
        if src is None:
            out.append(f"{module} is in no unit of the README's package order")
            continue
        for dep in deps:
            dst = unit_of(dep, units)
            if dst is not None and dst != src and line[dst] >= line[src]:
                out.append(f"{module} -> {dep} ({src} may not import {dst})")
    return sorted(out)


def test_the_order_checker_finds_an_upward_import_and_a_sideways_one() -> None:
    order = [["a"], ["b", "c"], ["d"]]
    graph = {"a.x": set(), "b.y": {"a.x"}, "c.z": {"b.y"}, "d": {"c.z", "a.x"}, "a.w": {"d"}}
    assert order_violations(graph, order) == ["a.w -> d (a may not import d)",
                                              "c.z -> b.y (c may not import b)"]
    assert order_violations({"e.q": set()}, order) == [
        "e.q is in no unit of the README's package order"]
    # a unit with units inside it holds only itself
    assert order_violations({"p.new": set()}, [["p"], ["p.old"]]) == [
        "p.new is in no unit of the README's package order"]


def test_packages_follow_the_readme_order() -> None:
    order = package_order()
    assert len(order) > 15 and ["launch"] in order  # the block was found and read whole
    assert order_violations(import_graph(), order) == []


def test_the_checker_finds_a_cycle_and_a_clean_graph() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 70  # every module was read (a wrong root would pass vacuously)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_only_the_cli_imports_evaluation() -> None:
    offenders = sorted(
        f"{m} -> {d}" for m, deps in import_graph().items()
        if not m.startswith(("cpe_ray.evaluation", *EVALUATION_IMPORTERS))
        for d in deps if d.startswith("cpe_ray.evaluation"))
    assert offenders == []


def test_config_is_a_leaf() -> None:
    graph = import_graph()
    outside = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith("cpe_ray.config")
                     for d in deps if not d.startswith(("cpe_ray.config", "cpe_ray.errors")))
    assert outside == []


def test_top_level_is_short() -> None:
    top = sorted(p.name for p in (ROOT / "cpe_ray").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_no_package_init_imports_a_heavy_backend() -> None:
    heavy = ("vllm", "deepspeed", "openai", "torch")
    for init in (ROOT / "cpe_ray").rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in heavy], init


def test_test_modules_have_unique_names() -> None:
    """tests/ has no packages: two test files of one name make pytest stop at collection."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) > 50 and sorted({n for n in names if names.count(n) > 1}) == []
