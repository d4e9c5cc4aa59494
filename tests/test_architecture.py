"""Structure of the package, read from its source with `ast` (nothing is imported or compiled).

- No import cycle between jaxinduct's modules: a cycle makes import order matter and
  hides which module owns what.
- The on-disk checkpoint layout (Orbax item names, meta keys) is spelled in one module,
  jaxinduct/checkpoints/layout.py; everything else goes through its records and functions.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxinduct"
LAYOUT_MODULE = PACKAGE / "checkpoints" / "layout.py"
# Orbax item names and the meta keys that only the layout module may spell.
LAYOUT_STRINGS = frozenset({"params", "opt_state", "meta", "tokens_seen", "config_hash", "layout"})


def package_modules(package_dir: Path) -> dict[str, Path]:
    """Every module of a package by dotted name (a package is its ``__init__``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _owner(dotted: str, modules: Mapping[str, Path]) -> str | None:
    """The module that ``dotted`` names, or the nearest package above it; None outside."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in modules:
            return name
    return None


def _from_base(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a ``from X import ...`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = importer.split(".") if is_package else importer.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """importer -> imported modules of the same package, module-level and function-level.

    ``from a.b import c`` is an edge to the module ``a.b.c`` when there is one, else to
    ``a.b``; so a package's ``__init__`` re-exporting its submodules has edges to them, and
    a submodule importing names from its package has an edge to the package.
    """
    graph: dict[str, set[str]] = {}
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(_owner(alias.name, modules) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _from_base(node, importer, is_package)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.add(submodule if submodule in modules else _owner(base, modules))
        graph[importer] = {t for t in targets if t is not None and t != importer}
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a] (depth-first, in sorted order), or None."""
    on_path, done = set(), set()
    for root in sorted(graph):
        if root in done:
            continue
        path = [root]
        on_path.add(root)
        stack = [iter(sorted(graph.get(root, ())))]
        while stack:
            for child in stack[-1]:
                if child in on_path:
                    return path[path.index(child) :] + [child]
                if child not in done:
                    path.append(child)
                    on_path.add(child)
                    stack.append(iter(sorted(graph.get(child, ()))))
                    break
            else:  # every child explored
                node = path.pop()
                on_path.discard(node)
                done.add(node)
                stack.pop()
    return None


# --- the cycle finder itself ----------------------------------------------------------------


def test_find_cycle_on_synthetic_graphs():
    assert find_cycle({}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None  # a diamond is no cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}, "x": {"a"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"missing"}}) is None  # edges to modules outside the graph end there


def test_import_graph_sees_package_edges_and_function_level_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.a import f\n")
    (package / "a.py").write_text("import os\n\ndef f():\n    from pkg.sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from pkg import g\nfrom . import c\nfrom .c import h\n")
    (package / "sub" / "c.py").write_text("import pkg.sub.b as b\n")
    graph = import_graph(package_modules(package))
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg", "pkg.sub.c"},
        "pkg.sub.c": {"pkg.sub.b"},
    }
    assert find_cycle(graph) == ["pkg", "pkg.a", "pkg.sub.b", "pkg"]  # the package and its re-export
    del graph["pkg"]
    assert find_cycle(graph) == ["pkg.sub.b", "pkg.sub.c", "pkg.sub.b"]


# --- the package ----------------------------------------------------------------------------


def test_jaxinduct_has_no_import_cycle():
    cycle = find_cycle(import_graph(package_modules(PACKAGE)))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_the_layout_module_spells_the_checkpoint_layout():
    offenders = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        if path == LAYOUT_MODULE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in LAYOUT_STRINGS:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, (
        "checkpoint item names and meta keys belong to jaxinduct/checkpoints/layout.py "
        "(use its StepMeta, RunRecord and save/restore functions): " + "; ".join(offenders)
    )
