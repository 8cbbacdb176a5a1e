"""The house rules of docs/architecture.md, checked on the source: stage order, no import circles,
one owner per file format, cv2 only in io/ and flows/, no module over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "datp"
# Lower stages first; a module may import its own stage or a lower one.
STAGES = ("datp.io", "datp.flows", "datp.extract", "datp.synth", "datp.pool", "datp.finetune",
          "datp.demo", "datp.cli", "datp.__main__")
# Libraries that open datp's files, and the only modules allowed to import them.
OWNERS = {
    "cv2": ("datp.io.", "datp.flows."),
    "h5py": ("datp.io.h5header", "datp.flows.store", "datp.extract.store.", "datp.pool.runs"),
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module name imported anywhere in the file (module level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return names


def _stage(module: str) -> int | None:
    found = [i for i, s in enumerate(STAGES) if module == s or module.startswith(s + ".")]
    return found[-1] if found else None


def _graph() -> dict[str, set[str]]:
    return {m: {n for n in _imports(p) if n in MODULES and n != m} for m, p in MODULES.items()}


def test_no_lower_stage_imports_a_higher_one():
    bad = [f"{a} -> {b}" for a, outs in _graph().items() for b in outs
           if _stage(a) is not None and _stage(b) is not None and _stage(b) > _stage(a)]
    assert not bad, "lower stage imports a higher one: " + "; ".join(sorted(bad))


def test_no_import_circles():
    """No two modules reach each other through imports (a package's __init__ re-exporting its own
    submodules is the one allowed pattern: a submodule importing its package is not followed)."""
    graph = _graph()
    for module, outs in graph.items():  # drop edges from a submodule up to its own package
        graph[module] = {n for n in outs if not module.startswith(n + ".")}
    state: dict[str, int] = {}
    circles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles: " + "; ".join(circles)


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_file_libraries_only_in_their_owner_modules(library):
    allowed = OWNERS[library]
    users = [m for m, p in MODULES.items() if any(n == library or n.startswith(library + ".") for n in _imports(p))]
    bad = [m for m in users if not any(m == a or m.startswith(a) for a in allowed)]
    assert not bad, f"{library} imported outside {allowed}: {bad}"


def test_no_module_over_400_lines():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_every_cli_command_is_registered_and_documented():
    from click.testing import CliRunner

    from datp.cli import COMMANDS, main

    for name in COMMANDS:
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, f"datp {name} --help: {result.output}"
        assert len(result.output.splitlines()) > 3, f"datp {name} --help says almost nothing"


def test_benchmarks_import_nothing_of_the_tests():
    """bench/ runs from a checkout without the test helpers: no datp_testing, conftest or tests/ path."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    bad = []
    for path in sorted(bench.glob("*.py")):
        names = _imports(path)
        text = path.read_text()
        if names & {"datp_testing", "conftest", "pytest"} or '"tests"' in text or "'tests'" in text:
            bad.append(path.name)
    assert not bad, "bench files importing test helpers: " + ", ".join(bad)
