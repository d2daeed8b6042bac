"""diamond/seeds.py is the one home of the run's random streams: distinct ids, distinct draws,
and no stream derived from a seed anywhere else in the library or the stages."""

from __future__ import annotations

import ast

import pytest

from conftest import ROOT
from diamond import seeds


def test_stream_ids_are_distinct() -> None:
    ids = list(seeds.STREAMS.values())
    assert len(set(ids)) == len(ids), seeds.STREAMS
    # the per-epoch purposes of train-agent are the third entry of [seed, epoch, purpose]
    assert len({seeds.AGENT_TRAIN_ENV[1], seeds.AGENT_TEST_POLICY, seeds.AGENT_TEST_ENV}) == 3


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_streams_draw_differently(seed: int) -> None:
    draws = {f"stream {name}": seeds.derived_seed(seed, i) for name, i in seeds.STREAMS.items()}
    draws["train env"] = seeds.derived_seed(seed, *seeds.AGENT_TRAIN_ENV)
    for epoch in range(1, 4):
        draws[f"test policy {epoch}"] = seeds.derived_seed(seed, epoch, seeds.AGENT_TEST_POLICY)
        draws[f"test env {epoch}"] = seeds.derived_seed(seed, epoch, seeds.AGENT_TEST_ENV)
    assert len(set(draws.values())) == len(draws)
    first = {name: seeds.stream_rng(seed, i).integers(2**62) for name, i in seeds.STREAMS.items()}
    assert len(set(first.values())) == len(first)


def test_no_stream_is_derived_outside_the_registry() -> None:
    """`default_rng([...])` and `SeedSequence([...])` on a list (a seed mixed with a stream id)
    appear only in diamond/seeds.py."""
    found = []
    for path in sorted((ROOT / "diamond").rglob("*.py")) + sorted((ROOT / "stages").rglob("*.py")):
        if path.name == "seeds.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("default_rng", "SeedSequence") and node.args \
                    and isinstance(node.args[0], ast.List):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
