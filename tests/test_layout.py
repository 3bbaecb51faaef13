"""The package's import graph: no import cycles anywhere, the packages in layers (the README's layout sketch),
and every package listed in pyproject.toml.

Every module under src/teleguard is parsed with `ast` (nothing is imported). An edge A -> B is an
`import teleguard.B` or `from teleguard.B import ...` (relative imports resolved) at module level or inside a
function; `from package import name` also counts as an edge to the submodule `package.name` when there is one.
Imports under `if TYPE_CHECKING:` are left out: they never run.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from tests.support.paths import REPO

SRC = REPO / "src"
PACKAGE = "teleguard"
# The layers of the README's layout, top first: a module may import only from its own layer or those below.
LAYERS = (
    ("cli",),
    ("pipeline",),
    ("evaluate",),
    ("train",),
    ("serve",),
    ("engines",),
    ("plugins",),
    ("rewards",),
    ("data",),
    ("contract",),
    ("storage", "tiny_models", "offline", "loopback", "yaml_files"),
)


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_one(other)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        visit(node)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text("utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join([*base, node.module] if node.module else base)
                else:
                    module = node.module or ""
                targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            for target in targets:
                # `import teleguard.a.b` names the module a.b; the nearest known module stands for it
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE + ".") and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """One shortest cycle through each strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    out = []
    for component in components:
        start = min(component)
        # breadth-first from `start` back to itself, inside the component: the shortest cycle through it
        paths: dict[str, tuple[str, ...]] = {start: (start,)}
        queue = [start]
        cycle: tuple[str, ...] | None = None
        while queue and cycle is None:
            node = queue.pop(0)
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    cycle = paths[node]
                    break
                if nxt not in paths:
                    paths[nxt] = (*paths[node], nxt)
                    queue.append(nxt)
        assert cycle is not None
        out.append(cycle)
    return sorted(out)


def _show(cycle: tuple[str, ...]) -> str:
    return " -> ".join([*cycle, cycle[0]])


def test_the_graph_sees_the_packages_imports() -> None:
    graph = import_graph()
    assert "teleguard.engines.contract" in graph["teleguard.serve.policy"]
    assert "teleguard.engines.swift" in graph["teleguard.engines.factory"]  # a function-level import
    assert "teleguard.engines.swift" in graph["teleguard.engines"]


def test_cycles_are_found_and_printed() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert [_show(c) for c in cycles(graph)] == ["a -> b -> c -> a"]


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(_show(c) for c in found)


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    for depth, names in enumerate(LAYERS):
        if part in names:
            return depth
    raise AssertionError(
        f"{module}: in no layer of LAYERS (add its package there and to the README's layout)"
    )


def test_packages_import_only_the_layers_below() -> None:
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module != PACKAGE
        for target in targets
        if layer_of(target) < layer_of(module)
    )
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]["packages"]
    )
    found = {".".join(init.parent.relative_to(SRC).parts) for init in (SRC / PACKAGE).rglob("__init__.py")}
    assert found - listed == set(), "packages a wheel would leave out"
    assert listed - found == set(), "listed packages that do not exist"


def test_the_engines_do_not_import_the_serving_code() -> None:
    graph = import_graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module == "teleguard.engines" or module.startswith("teleguard.engines.")
        for target in targets
        if target == "teleguard.serve" or target.startswith("teleguard.serve.")
    )
    assert not wrong, "\n".join(wrong)


def test_the_long_files_the_test_runner_starts_first_exist() -> None:
    from tests.conftest import LONG_FILES

    assert [path for path in LONG_FILES if not (REPO / path).is_file()] == []
