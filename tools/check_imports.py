"""Check that ffkv_lens's import graph points one way: no cycle, no upward import.

Every ``import`` and ``from ... import`` of the package counts, at module level or inside a
function (lazy imports too), found by walking each module's syntax tree. Run from the repository
root: ``python tools/check_imports.py`` prints every violation and exits 1 when there is one.

The layers (docs/architecture.md, "Layers"): a module may import its own unit (the first
component below ``ffkv_lens``) and units of strictly lower layers; units of one layer do not
import each other. ``from ffkv_lens import Name`` counts as an import of the module that the top
package re-exports ``Name`` from (its ``_LAZY`` table).
"""

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "ffkv_lens"
TOP = "<top>"  # the top package itself: ffkv_lens/__init__.py and names it re-exports without a table entry

# Layer of each unit, highest first. Keep in step with docs/architecture.md ("Layers").
LAYERS: dict[str, int] = {
    "cli": 9,
    TOP: 8,
    "pipeline": 7,
    "comparison": 7,
    "browser": 7,
    "export": 7,
    "facts": 7,
    "report": 6,
    "lens": 5,
    "analysis": 4,
    "estimates": 4,
    "adapters": 3,
    "models": 2,
    "corpus": 1,
    "kernels": 1,
    "storage": 1,
    "distributed": 1,
    "errors": 0,
    "types": 0,
}
# The analysis core sees the adapters only through their interface, and never the top package.
CORE = ("analysis", "kernels", "storage", "corpus")
ADAPTER_INTERFACE = ("ffkv_lens.adapters", "ffkv_lens.adapters.base")


@dataclass(frozen=True)
class Edge:
    """One import: ``source`` imports ``target`` (module names) at ``path:line``."""

    source: str
    target: str
    path: str
    line: int
    via_top: bool  # written as ``import ffkv_lens`` / ``from ffkv_lens import Name``


def module_name(root: Path, path: Path) -> str:
    """Dotted module name of ``path`` under ``root`` (the folder that holds the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The unit of a module: ``ffkv_lens.analysis.atlas`` -> ``analysis``; the top package -> ``<top>``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else TOP


def lazy_table(root: Path) -> dict[str, str]:
    """The top package's ``_LAZY`` table: re-exported name -> module it comes from."""
    tree = ast.parse((root / PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    if not node.level:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.AST, module: str, is_package: bool, modules: set[str], lazy: dict[str, str]) -> Iterator:
    """``(target_module, via_top)`` for each package module ``node`` imports."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                yield alias.name, alias.name == PACKAGE
    elif isinstance(node, ast.ImportFrom):
        base = _absolute(module, node, is_package)
        if base is None or not (base == PACKAGE or base.startswith(PACKAGE + ".")):
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in modules:
                yield sub, False
            elif base == PACKAGE:
                yield lazy.get(alias.name, PACKAGE), True
            else:
                yield base, False


def collect_edges(root: Path) -> tuple[set[str], list[Edge]]:
    """All package modules under ``root`` and every import between them."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(root, path) for path in files}
    lazy = lazy_table(root)
    edges = []
    for path in files:
        module = module_name(root, path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for target, via_top in _targets(node, module, path.name == "__init__.py", modules, lazy):
                if target != module:
                    rel = path.relative_to(root).as_posix()
                    edges.append(Edge(module, target, rel, node.lineno, via_top))
    return modules, edges


def layer_violations(edges: list[Edge]) -> list[str]:
    """One line per import that goes up, sideways (another unit of the same layer) or past an interface."""
    lines = []
    for edge in edges:
        src, dst = unit(edge.source), unit(edge.target)
        where = f"{edge.path}:{edge.line}: {edge.source} imports {edge.target}"
        if src not in LAYERS or dst not in LAYERS:
            lines.append(f"{where}: unit {src if src not in LAYERS else dst!r} has no layer in LAYERS")
            continue
        if src in CORE and edge.via_top:
            lines.append(f"{where}: the analysis core must not import the top package {PACKAGE}")
        if src in CORE and dst == "adapters" and edge.target not in ADAPTER_INTERFACE:
            lines.append(f"{where}: the analysis core sees adapters only through {' or '.join(ADAPTER_INTERFACE)}")
        if src != dst and LAYERS[dst] >= LAYERS[src]:
            kind = "sideways" if LAYERS[dst] == LAYERS[src] else "upward"
            lines.append(f"{where}: {kind} ({src}, layer {LAYERS[src]} -> {dst}, layer {LAYERS[dst]})")
    return lines


def cycles(modules: set[str], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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
            visit(node)
    return sorted(found)


def cycle_violations(modules: set[str], edges: list[Edge]) -> list[str]:
    """One line per import cycle, with the imports that close it."""
    lines = []
    for component in cycles(modules, edges):
        members = set(component)
        inside = sorted({f"{e.path}:{e.line}" for e in edges if e.source in members and e.target in members})
        lines.append(f"import cycle: {' <-> '.join(component)} (imports at {', '.join(inside)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print every violation under ``--root`` (default: the repository root); 1 when there is one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    root = parser.parse_args(argv).root
    modules, edges = collect_edges(root)
    problems = cycle_violations(modules, edges) + layer_violations(edges)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} import violation(s); layers: tools/check_imports.py LAYERS, docs/architecture.md")
        return 1
    print(f"import graph ok: {len(modules)} modules, {len(edges)} imports, no cycle, none upward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
