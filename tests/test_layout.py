"""The package's layout, read from its source: which part may import which, no
cycles, and modules of a size one can read.

The parts, bottom to top: the argument checks and the state copy (`_checks`,
`_state`) and the data readers (`data`); the layer (`_nn`) and the SAM family
(`_sam`), side by side and apart; the whole-model tools (`_tools`), on the layer;
checkpoints and placement (`_io`); the public namespace; and the experiments, which
use only what users can import.

It reads the source: every import statement, every attribute chain on the package
(`eqx_norm._nn.BatchNorm`), and no import by name (`importlib.import_module`).
Importing any submodule still runs `eqx_norm/__init__.py`, which loads every part:
the layout is that of the code's own references, which is what a reader follows.
"""

import ast
import collections
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "eqx_norm"

# Each part and the parts it may import (besides itself).
FOUNDATION = {"_checks", "_state", "data"}
ALLOWED = {
    "_checks": set(),
    "_state": set(),
    "data": set(),
    "_nn": {"_checks", "_state"},
    "_sam": {"_checks", "_state"},
    "_tools": FOUNDATION | {"_nn"},
    "_io": FOUNDATION | {"_nn", "_tools"},
    "": FOUNDATION | {"_nn", "_sam", "_tools", "_io"},  # eqx_norm/__init__.py
    "experiments": {"", "data"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every module's imports of the package, relative or absolute, at the top of
    the file or inside a function; `from . import _module` is an import of that
    module, not of the package."""
    modules = {_module(path) for path in PACKAGE.rglob("*.py")}
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: package.count(".") + 2 - node.level]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    targets.add(submodule if submodule in modules else target)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Attribute):
                # `eqx_norm._nn._batch_norm.BatchNorm` reached through an import of
                # another module: the attribute chain names the module it uses.
                dotted = _dotted(node) or ""
                if dotted.count(".") > 1:  # a module's attribute: the module
                    dotted = dotted.rpartition(".")[0]
                if dotted.startswith("eqx_norm."):
                    targets.add(dotted)
            elif isinstance(node, ast.Call) and _imports_by_name(node):
                raise AssertionError(
                    f"{name} imports by name ({ast.unparse(node)}): import the module "
                    "itself, so that the layout can be read"
                )
        graph[name] = {t for t in targets if t.split(".")[0] == "eqx_norm"}
    return graph


def _dotted(node: ast.expr) -> str | None:
    """`a.b.c` for an attribute chain on a name, else `None`."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _imports_by_name(node: ast.Call) -> bool:
    """`importlib.import_module(...)` or `__import__(...)`, which the import
    statements above would not show."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in {"import_module", "__import__"}


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    if len(parts) == 2 and parts[1] not in ALLOWED:
        raise AssertionError(f"{module} is in no part; add it to one (or to ALLOWED)")
    return parts[1]


GRAPH = _imports()


def test_the_graph_reads_the_imports():
    # The reader finds what is there, so that the checks below can fail.
    assert "eqx_norm._nn._batch_norm" in GRAPH["eqx_norm._tools._fold"]
    assert "eqx_norm._checks" in GRAPH["eqx_norm._sam._sam"]
    assert "eqx_norm._sam._contract" in GRAPH["eqx_norm._sam._step"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_each_part_imports_only_the_parts_below_it(module):
    part = _part(module)
    for target in GRAPH[module]:
        assert _part(target) in ALLOWED[part] | {part}, (
            f"{module} imports {target}: the part {part or 'eqx_norm'} may import "
            f"only {sorted(ALLOWED[part])}"
        )


def test_the_sam_family_reaches_nothing_of_the_layer():
    # Not only directly: nothing it imports may import the layer either.
    seen, todo = set(), [m for m in GRAPH if _part(m) == "_sam"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(t for t in GRAPH.get(module, ()) if t in GRAPH)
    reached = {m for m in seen if _part(m) in {"_nn", "_tools", "_io", ""}}
    assert not reached, reached


def test_no_import_cycles():
    graph = {m: {t for t in ts if t in GRAPH and t != m} for m, ts in GRAPH.items()}
    # Kahn's algorithm: a cycle leaves modules that never reach in-degree zero.
    indegree = collections.Counter(t for ts in graph.values() for t in ts)
    ready = [m for m in graph if not indegree[m]]
    while ready:
        for t in graph[ready.pop()]:
            indegree[t] -= 1
            if not indegree[t]:
                ready.append(t)
    assert not +indegree, sorted(+indegree)


def test_modules_of_a_readable_size():
    sizes = {p: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {str(p.relative_to(PACKAGE)): n for p, n in sizes.items() if n > 500}
    assert not long, long
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 6, top


def test_each_part_says_what_it_holds():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.parent.name}/__init__.py opens with no docstring"
