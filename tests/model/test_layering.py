"""The model's import graph: no cycle, and each layer imports only the layers below it.

Layers, bottom up: state (``mm`` state classes, ``task``, ``trace``), the kernel
paths of ``mm`` and then ``kvm`` and ``fs``, the designs, the batched paths
(which re-state designs' code), and the machine that puts them together.  Only
runtime imports count: ``if TYPE_CHECKING:`` blocks are for annotations.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gmemlab

ROOT = Path(gmemlab.__file__).parent
# Module prefixes, lowest first; a module may import its own layer and the ones below.
LAYERS = (
    ("gmemlab.uapi", "gmemlab.api", "gmemlab.guest", "gmemlab.model.task", "gmemlab.model.trace",
     "gmemlab.model.fault_inject"),
    ("gmemlab.model.mm", "gmemlab.model.fs"),
    ("gmemlab.model.kvm",),
    ("gmemlab.model.designs",),
    ("gmemlab.model.ranges", "gmemlab.model.invariants"),
    ("gmemlab.model.machine", "gmemlab.model.host", "gmemlab.model"),
)


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path, name: str) -> set[str]:
    """Modules ``path`` imports when it runs (module level and inside functions)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                out.update(f"{base}.{a.name}" for a in child.names)
                out.add(base)
            elif isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    model = {n: p for n, p in files.items() if n.startswith(("gmemlab.model", "gmemlab.uapi",
                                                               "gmemlab.api", "gmemlab.guest"))}
    graph: dict[str, set[str]] = {}
    for name, path in model.items():
        graph[name] = {t for t in _runtime_imports(path, name) if t in model and t != name}
    return graph


def _layer(name: str) -> int:
    best = (-1, -1)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best[1]:
                best = (i, len(p))
    assert best[0] >= 0, f"{name} is in no layer"
    return best[0]


def test_no_import_cycle() -> None:
    graph = _graph()
    seen: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [node])


def test_layers_import_only_downwards() -> None:
    wrong = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets
                   if _layer(b) > _layer(a))
    assert not wrong, "imports up the layers:\n" + "\n".join(wrong)
