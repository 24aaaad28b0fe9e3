"""The project's import graph has no circles, and data_shards stays below megavla.data (issue 26).

The graph is read from the source with `ast` (nothing is imported), over the four folders that
install as the `megavla` package: `megavla/`, and the script folders `data_shards/`, `kernels/`,
`launch/`, which setup.py installs as `megavla.data_shards`, `megavla.kernels`, `megavla.launch`.

What counts as an edge, and why:
- every `import` / `from ... import`, at module level AND inside functions: a lazy import that
  closes a circle only hides the circle from the interpreter, the two modules still need each
  other, so it is a circle of the design all the same;
- `importlib.import_module("literal")` too, so a registry cannot hide a circle behind a string;
- NOT imports under `if TYPE_CHECKING:`, which never run and exist for annotations only;
- an edge goes to the module actually named (`from megavla.data import hands` -> the module
  `megavla.data.hands`; `from megavla.data import Name` -> the package `megavla.data`), not to
  every parent package the interpreter also initialises on the way, which would make every
  package `__init__` that re-exports a submodule look like a circle with that submodule.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# source folder -> the dotted name it installs as (setup.py's package_dir)
INSTALLED_AS = {
    "megavla": "megavla",
    "data_shards": "megavla.data_shards",
    "kernels": "megavla.kernels",
    "launch": "megavla.launch",
}


def module_files(root: Path = REPO_ROOT) -> dict[str, Path]:
    """Dotted installed name -> source file, for every .py file of the four folders."""
    modules = {}
    for folder, package in INSTALLED_AS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _is_type_checking_guard(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import node and import_module("...") call, skipping `if TYPE_CHECKING:` bodies
    (their `else:` branch runs, so it is kept)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking_guard(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                    or (isinstance(node.func, ast.Name) and node.func.id == "import_module")):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` (at `path`) imports; outside names are dropped."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    targets: set[str] = set()

    def add(dotted: str):
        # the longest prefix that is a project module (`import megavla.data.hands as h` -> hands)
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in known:
                targets.add(candidate)
                return

    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, is_package, node.level, node.module) if node.level \
                else node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in known else base)
        else:  # import_module("...")
            add(node.args[0].value)
    targets.discard(module)
    return targets


def import_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    known = set(files)
    return {module: imported_modules(module, path, known) for module, path in files.items()}


def import_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components that hold a circle (modules that all reach each
    other through imports), each sorted. Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One closed module chain (`a -> b -> a`) per tangled component, so a failure says which
    imports to cut; a component may hold more circles than the one chain shows."""
    return [_chain_through(graph, set(component)) for component in import_components(graph)]


def _chain_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest circle from the component's first module back to itself (breadth-first)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in component:
                    continue
                if child == start:
                    chain = [start]
                    while node != start:
                        chain.append(node)
                        node = previous[node]
                    chain.append(start)
                    return [start, *reversed(chain[1:-1]), start] if len(chain) > 2 else [start, start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no circle through {start} in {sorted(component)}")


def _describe(graph: dict[str, set[str]]) -> str:
    lines = []
    for component in import_components(graph):
        chain = _chain_through(graph, set(component))
        lines.append("  " + " -> ".join(chain))
        if len(component) > len(chain) - 1:
            lines.append(f"    (the same tangle also holds: {', '.join(sorted(set(component) - set(chain)))})")
        for module in component:
            inside = sorted(set(graph[module]) & set(component))
            lines.append(f"    {module} imports {', '.join(inside)}")
    return "\n".join(lines)


# ---- the finder itself, on small graphs whose answer is known ----

def test_cycle_finder_reports_each_circle_as_a_chain():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": {"g"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"], ["g", "g"]]


def test_failure_message_names_each_chain_and_the_imports_inside_it():
    """_describe runs only when the project test fails: exercised here so that it cannot break
    unseen."""
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}}
    assert _describe(graph).splitlines() == [
        "  a -> b -> a",
        "    (the same tangle also holds: c)",
        "    a imports b",
        "    b imports a, c",
        "    c imports a",
    ]


def test_cycle_finder_passes_an_acyclic_graph():
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}) == []


def test_scanner_counts_lazy_imports_and_resolves_relative_ones(tmp_path):
    """A scratch tree with one circle closed by a function-level relative import, and one
    `if TYPE_CHECKING:` import that must not count."""
    pkg = tmp_path / "megavla" / "model"
    pkg.mkdir(parents=True)
    (tmp_path / "megavla" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "vla.py").write_text("from megavla.model.flops import count\n")
    (pkg / "flops.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from megavla.model.inference import Runner\n"
        "def count():\n    from . import vla\n")
    (pkg / "inference.py").write_text("import megavla.model.vla as vla\n")
    for folder in ("data_shards", "kernels", "launch"):
        (tmp_path / folder).mkdir()
    graph = import_graph(tmp_path)
    assert graph["megavla.model.flops"] == {"megavla.model.vla"}
    assert find_cycles(graph) == [["megavla.model.flops", "megavla.model.vla", "megavla.model.flops"]]


# ---- the project ----

def test_script_folders_map_to_their_installed_names():
    modules = module_files()
    assert "megavla.launch.sweep" in modules and "megavla.kernels.dispatch" in modules
    assert "megavla.data_shards" in modules and "megavla.data.cli" in modules
    graph = import_graph()
    assert sum(len(targets) for targets in graph.values()) > 100, "the scan found almost no imports"


def test_no_import_circles():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, (f"{len(cycles)} import circle(s) (function-level imports count; "
                        f"`if TYPE_CHECKING:` ones do not):\n{_describe(graph)}")


def test_data_shards_does_not_import_megavla_data():
    """data_shards (the shard format, writers, verify) sits below the loader in megavla.data."""
    graph = import_graph()
    upward = sorted(f"{module} -> {target}" for module, targets in graph.items()
                    if module.startswith("megavla.data_shards")
                    for target in targets
                    if target == "megavla.data" or target.startswith("megavla.data."))
    assert not upward, "data_shards imports megavla.data:\n  " + "\n  ".join(upward)
