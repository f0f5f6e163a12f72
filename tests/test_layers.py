"""The layers hold: core/ never imports Streamlit or the pages, and core's modules import each
other without a cycle (lazy imports inside functions count too: a lazy import only hides one)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.If) and top_level_only:       # `if TYPE_CHECKING:` imports don't run
            continue
    return found


CORE = {module_name(p): p for p in sorted((ROOT / "core").rglob("*.py"))}


def test_core_never_imports_streamlit_or_the_pages():
    arrows = {name: sorted(d for d in imports(path, False) if d.split(".")[0] in ("streamlit", "pages"))
              for name, path in CORE.items()}
    assert {k: v for k, v in arrows.items() if v} == {}


def test_core_has_no_import_cycle():
    graph = {name: {d for d in imports(path, False) if d in CORE and d != name} for name, path in CORE.items()}
    # a package imports its own __init__ on the way to a submodule: not an edge worth counting
    graph = {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_core_is_grouped_by_concern():
    """Only the shared basics sit at the top of core/; everything else lives in a group."""
    top = sorted(p.stem for p in (ROOT / "core").glob("*.py"))
    assert top == ["__init__", "__main__", "cli", "config", "device", "hooks", "paths", "progress", "rng", "tables"]
    assert sorted(p.name for p in (ROOT / "core").iterdir() if p.is_dir() and p.name != "__pycache__") == \
        ["data", "models", "results", "serve", "training", "trust"]
