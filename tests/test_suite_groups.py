"""The suite's schedule (tests/conftest.py): the groups it names for pytest-xdist exist, so a
renamed test or file cannot silently drop to the end of the queue."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import LONGEST_FIRST, OWN_GROUP_PER_TEST, SHARED_TINY_RUNS, xdist_group

TESTS = Path(__file__).parent


def functions_of(module: str) -> set[str]:
    tree = ast.parse((TESTS / f"{module}.py").read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_group_named_first_exists() -> None:
    for group in LONGEST_FIRST:
        module, _, function = group.partition("::")
        if group == "tiny_runs":
            assert all((TESTS / f"{m}.py").is_file() for m in SHARED_TINY_RUNS)
            continue
        assert (TESTS / f"{module}.py").is_file(), f"LONGEST_FIRST names {group!r}: no tests/{module}.py"
        if module in OWN_GROUP_PER_TEST:
            assert function in functions_of(module), f"LONGEST_FIRST names {group!r}: no such test"
        else:
            assert not function, f"LONGEST_FIRST names {group!r}, but {module} is one group, not one per test"


def test_groups_are_files_the_shared_runs_and_learning_tests() -> None:
    assert xdist_group("tests/test_env.py::test_x[Pong]") == "test_env"
    assert xdist_group("tests/test_provenance.py::test_y") == xdist_group("tests/test_sharing.py::test_z") == "tiny_runs"
    assert xdist_group("tests/test_world_model_learning.py::test_d") == "test_world_model_learning::test_d"
