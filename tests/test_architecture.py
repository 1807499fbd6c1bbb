"""Architecture rules (DESIGN.md "Imports flow one way"), checked on the source files themselves.

- No import cycle among the files of fxquant/, passes/ (fxquant.passes) and codegen/ (fxquant.codegen):
  a file importing one that imports it back, directly or through others. Every import counts: module
  level, inside functions, under `if TYPE_CHECKING`, and `importlib.import_module("<constant>")`; importing
  `a.b.c` also depends on the package `a.b` (its __init__ runs first).
- No module in passes/ imports another pass module: passes share code only through the core.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fxquant": "fxquant", "passes": "fxquant.passes", "codegen": "fxquant.codegen"}


def module_files(root: Path, packages: dict[str, str] = PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} for every .py file under the package folders."""
    mods = {}
    for folder, dotted in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join((dotted, *parts))] = path
    return mods


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name an import statement (anywhere in the file) or import_module("...") names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def import_graph(root: Path = ROOT, packages: dict[str, str] = PACKAGES) -> nx.DiGraph:
    """Edges module -> module it imports, among the project's own files (top-level `passes.x` is aliased)."""
    mods = module_files(root, packages)
    aliases = {f"{folder}.": f"{dotted}." for folder, dotted in packages.items() if folder != dotted}
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for module, path in mods.items():
        for name in imported_names(module, path):
            for short, full in aliases.items():
                if name.startswith(short) or name == short[:-1]:
                    name = full[:-1] + name[len(short) - 1 :]
            if name in mods and name != module:
                graph.add_edge(module, name)
            parts = name.split(".")
            for i in range(1, len(parts)):  # importing a.b.c runs a/b/__init__.py first
                parent = ".".join(parts[:i])
                if parent in mods and not (module == parent or module.startswith(parent + ".")):
                    graph.add_edge(module, parent)
    return graph


def import_cycles(graph: nx.DiGraph) -> list[list[str]]:
    """One example cycle per strongly connected component of more than one file."""
    out = []
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1:
            nodes = [a for a, _ in nx.find_cycle(graph.subgraph(component))]
            start = nodes.index(min(nodes))  # a stable spelling: from the smallest name
            nodes = nodes[start:] + nodes[:start]
            out.append(nodes + [nodes[0]])
    return sorted(out)


def pass_to_pass_imports(graph: nx.DiGraph, package: str = "fxquant.passes") -> list[tuple[str, str]]:
    return sorted(
        (a, b) for a, b in graph.edges if a.startswith(package + ".") and b.startswith(package + ".")
    )


def test_no_import_cycle_between_files():
    cycles = import_cycles(import_graph())
    assert cycles == [], "import cycles (move the shared piece into a lower module):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_no_pass_module_imports_another_pass_module():
    edges = pass_to_pass_imports(import_graph())
    assert edges == [], f"pass modules importing each other (share code through fxquant/ instead): {edges}"


def test_graph_covers_the_three_packages():
    graph = import_graph()
    assert {"fxquant.api", "fxquant.passes.lower", "fxquant.codegen.kernels"} <= set(graph)
    assert graph.has_edge("fxquant.api", "fxquant.passmanager")  # a known module-level import
    assert graph.has_edge("fxquant.passes.quantize", "fxquant.lowering")
    assert graph.has_edge("fxquant.api", "fxquant.codegen")  # via fxquant.codegen.targets


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def test_checker_finds_a_cycle_through_a_function_local_import(tmp_path):
    root = _tree(
        tmp_path,
        {
            "fxquant/__init__.py": "",
            "fxquant/a.py": "from . import b\n",
            "fxquant/b.py": "def f():\n    from .c import g\n",
            "fxquant/c.py": "def g():\n    import fxquant.a\n",
            "passes/__init__.py": "",
            "passes/p.py": "from fxquant.passes.q import x\n",
            "passes/q.py": "import importlib\nimportlib.import_module('passes.r')\n",
            "passes/r.py": "from fxquant import c\n",
        },
    )
    graph = import_graph(root, {"fxquant": "fxquant", "passes": "fxquant.passes"})
    assert import_cycles(graph) == [["fxquant.a", "fxquant.b", "fxquant.c", "fxquant.a"]]
    assert pass_to_pass_imports(graph) == [
        ("fxquant.passes.p", "fxquant.passes.q"),
        ("fxquant.passes.q", "fxquant.passes.r"),
    ]


def test_checker_accepts_one_way_imports(tmp_path):
    root = _tree(
        tmp_path,
        {
            "fxquant/__init__.py": "",
            "fxquant/low.py": "X = 1\n",
            "fxquant/high.py": "def f():\n    from .low import X\n    return X\n",
        },
    )
    graph = import_graph(root, {"fxquant": "fxquant"})
    assert import_cycles(graph) == [] and list(graph.edges) == [("fxquant.high", "fxquant.low")]
