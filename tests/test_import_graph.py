"""The layers by their imports (docs/architecture.md): the library `diamond/` imports neither the
stages, the benchmarks nor the pipeline tools, and no project module imports itself back
through others (a cycle), counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diamond", "stages", "benchmarks")
PIPELINE_TOOLS = ("dvc", "snakemake", "mlflow")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from a import b` counts a.b when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    names = {module_name(p) for p in files}
    return {module_name(p): {m for m in imports(p) if m in names and m != module_name(p)} for p in files}


def test_the_library_imports_no_stage_benchmark_or_pipeline_tool() -> None:
    for path in (ROOT / "diamond").rglob("*.py"):
        bad = {m for m in imports(path) if m.split(".")[0] in ("stages", "benchmarks", *PIPELINE_TOOLS)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_import_cycle() -> None:
    graph = project_graph()
    # An edge to a package is an edge to its __init__ (what it imports), not to all its modules.
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else nxt
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert len(graph) > 40  # the walk saw the project (every module of the three packages)


def test_results_import_no_training_code() -> None:
    """Scores, tables and reports read artifacts: diamond/results/ never reaches into the agent's or
    the world model's code (docs/architecture.md), so reporting changes cannot touch training."""
    for path in (ROOT / "diamond" / "results").rglob("*.py"):
        bad = {m for m in imports(path) if m.startswith(("diamond.agent", "diamond.world_model", "diamond.models"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


STAGE_MAX_LINES = 200


def test_stage_modules_are_thin_entry_points() -> None:
    """A stage wires params, artifacts and tracking to the library (docs/architecture.md): each
    command-line module of stages/ stays under STAGE_MAX_LINES lines and defines no class; the
    method itself lives in diamond/."""
    entry_points = [p for p in (ROOT / "stages").glob("*.py") if '__name__ == "__main__"' in p.read_text()]
    assert len(entry_points) >= 10  # the walk saw the stages
    for path in entry_points:
        tree = ast.parse(path.read_text())
        lines = len(path.read_text().splitlines())
        assert lines <= STAGE_MAX_LINES, f"{path.relative_to(ROOT)}: {lines} lines; move the logic into diamond/"
        assert not any(isinstance(n, ast.ClassDef) for n in ast.walk(tree)), f"{path.relative_to(ROOT)} defines a class"


def test_each_subpackage_says_what_it_is() -> None:
    """Each package of diamond/ opens with a docstring of at most three lines that says what it
    is and cites the paper or docs/ for the part of the method it implements."""
    packages = sorted((ROOT / "diamond").glob("*/__init__.py"))
    assert len(packages) >= 8  # the walk saw the subpackages
    for init in packages:
        doc = ast.get_docstring(ast.parse(init.read_text()))
        name = init.parent.relative_to(ROOT)
        assert doc, f"{name}/__init__.py has no docstring"
        assert len(doc.splitlines()) <= 3, f"{name}/__init__.py: a docstring of {len(doc.splitlines())} lines"
        assert "paper" in doc or "docs/" in doc, f"{name}/__init__.py cites neither the paper nor docs/"
