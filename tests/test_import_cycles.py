"""No import cycles among ccm_sdk's modules, nor among ccm_world's, and nothing outside
ccm_sdk/training imports training's modules (only the package's public names).

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``, at
module level and inside functions alike (a lazy import still ties two modules together), except
those under ``if TYPE_CHECKING:``, which never run. ``from package import name`` counts as an
import of ``package.name`` when that is a module, else of the package. Imports by string
(``importlib.import_module``, entry points) are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ccm_sdk": ROOT / "ccm_sdk", "ccm_world": ROOT / "plugins" / "ccm-world" / "ccm_world"}


def modules(package: str, folder: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's __init__)."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = [package, *path.relative_to(folder).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(name: str, is_package: bool, tree: ast.AST) -> list[tuple[str, str | None]]:
    """What module ``name`` imports: ``(module, None)`` for ``import module``, ``(module, attribute)``
    for ``from module import attribute`` (relative imports made absolute)."""
    found: list[tuple[str, str | None]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            found.extend((module, alias.name) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def resolve(module: str, attribute: str | None, known) -> str | None:
    """The known module an import loads: ``module.attribute`` when that is a module, else ``module``
    or the closest package above it; None when it is none of ``known``."""
    if attribute is not None and f"{module}.{attribute}" in known:
        return f"{module}.{attribute}"
    while module and module not in known:
        module = module.rpartition(".")[0]
    return module or None


def import_graph(package: str, folder: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    found = modules(package, folder)
    graph: dict[str, set[str]] = {name: set() for name in found}
    for name, (path, is_package) in found.items():
        for module, attribute in imported(name, is_package, ast.parse(path.read_text(), str(path))):
            target = resolve(module, attribute, found)
            if target is not None and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles(package):
    graph = import_graph(package, PACKAGES[package])
    assert len(graph) > 10  # the package was found
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_lazy_imports_count_and_type_checking_imports_do_not():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
        "def f():\n    from .c import g\n    from . import d\n"
    )
    assert imported("p.a", False, tree) == [("typing", "TYPE_CHECKING"), ("p.c", "g"), ("p", "d")]
    known = {"p", "p.a", "p.c", "p.d"}
    assert [resolve(m, a, known) for m, a in imported("p.a", False, tree)] == [None, "p.c", "p.d"]


def test_only_training_imports_its_own_modules():
    """Outside ccm_sdk/training, code imports ``ccm_sdk.training`` (its public, lazily loaded names) only;
    the built-in trainers' registration (ccm_sdk.builtin.trainers) imports each trainer's module, as a
    third-party plugin imports its own."""
    sdk = modules("ccm_sdk", PACKAGES["ccm_sdk"])
    offenders = []
    for package, folder in PACKAGES.items():
        for name, (path, is_package) in modules(package, folder).items():
            if name.startswith("ccm_sdk.training") or name == "ccm_sdk.builtin.trainers":
                continue
            for module, attribute in imported(name, is_package, ast.parse(path.read_text(), str(path))):
                target = resolve(module, attribute, sdk)
                if target is not None and target.startswith("ccm_sdk.training."):
                    offenders.append(f"{name} imports {target}")
    assert offenders == []
