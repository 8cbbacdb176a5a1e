"""The house rules of datp/'s imports: no lower stage imports a higher one (io < flows < extract <
pool < finetune; synth sits on io, demo and the CLI on top) and no module-level import circles.

Run `python tests/io/test_layers.py` for the report (function-local circles too)."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = {"datp": 0, "datp.io": 0, "datp.synth": 0.5, "datp.flows": 1, "datp.extract": 2,
          "datp.pool": 3, "datp.finetune": 4, "datp.demo": 5, "datp.cli": 5, "datp.__main__": 5}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stage(mod: str) -> float:
    prefix = max((p for p in STAGES if mod == p or mod.startswith(p + ".")), key=len)
    return STAGES[prefix]


def import_graph() -> dict[str, dict[str, bool]]:
    """{module: {datp module it imports: True when at module level}}."""
    modules = {module_name(p): p for p in (ROOT / "datp").rglob("*.py")}
    edges = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        out = {}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` imports the submodule; `from mod import name`, mod
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                         else node.module for a in node.names]
            for n in names:
                if n.split(".")[0] != "datp":
                    continue
                while n not in modules and "." in n:
                    n = n.rsplit(".", 1)[0]
                if n in modules and n != mod:
                    out[n] = out.get(n, False) or id(node) in top
        edges[mod] = out
    return edges


def upward(edges) -> list[tuple[str, str, bool]]:
    return sorted((m, n, top) for m, ns in edges.items() for n, top in ns.items()
                  if stage(n) > stage(m))


def circles(edges, *, top_only: bool) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: [n for n, t in ns.items() if t or not top_only] for m, ns in edges.items()}
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
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


def test_no_lower_stage_imports_a_higher_one():
    assert upward(import_graph()) == []


def test_no_module_level_import_circles():
    assert circles(import_graph(), top_only=True) == []


def test_cv2_only_in_io_and_flows():
    """OpenCV (decoding helpers, flow, jpg folders) stays in the two stages that own pixels."""
    users = set()
    for path in (ROOT / "datp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(n.split(".")[0] == "cv2" for n in names):
                users.add(module_name(path))
    assert {u for u in users if stage(u) > STAGES["datp.flows"]} == set()


if __name__ == "__main__":
    edges = import_graph()
    print(f"{len(edges)} modules, {sum(len(v) for v in edges.values())} datp imports")
    bad = upward(edges)
    print("upward imports (a lower stage importing a higher one):", "none" if not bad else "")
    for m, n, top in bad:
        print(f"  {m} -> {n}" + ("" if top else " (inside a function)"))
    for label, top_only in (("module-level imports", True),
                            ("all imports, function-local included", False)):
        found = circles(edges, top_only=top_only)
        print(f"import circles ({label}):", "none" if not found else "")
        for c in found:
            print("  " + " <-> ".join(c))
    sys.exit(1 if bad or circles(edges, top_only=True) else 0)
