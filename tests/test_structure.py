"""The package's shape: no import cycle among its modules (every import statement counts, including
those inside functions), and every method reachable through the registry alone."""

import ast
from pathlib import Path

import prehab_svd

ROOT = Path(prehab_svd.__file__).resolve().parent


def _modules() -> dict:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def _imports(name: str, path: Path, mods: dict) -> set:
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = pkg
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
            for a in node.names:
                full = f"{target}.{a.name}"
                out.add(full if full in mods else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in mods and m != name}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    mods = _modules()
    # a subpackage importing its own __init__ is not a cycle of concerns: only module-to-module edges
    graph = {m: {d for d in _imports(m, f, mods) if not m.startswith(d + ".")} for m, f in mods.items()}
    assert len(graph) > 30  # the walk found the package
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_method_is_in_the_registry():
    from prehab_svd import methods
    from prehab_svd.compression import METHODS

    assert METHODS == methods.names() == ("svd", "asvd", "svd-llm", "aa-svd", "zs-svd")
    files = {f.stem for f in (ROOT / "methods").glob("*.py")} - {"__init__", "base"}
    assert files == {"svd", "asvd", "svd_llm", "aa_svd", "zs_svd"}
