"""The fault campaign, short: train-world-model and train-agent each SIGKILLed twice at seeded random
moments and rerun to completion end with the artifacts of an uninterrupted run
(scripts/fault_campaign.py; the full campaign's table is in docs/results.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from agent_helpers import agent_params_dict
from conftest import ROOT, write_params

sys.path.insert(0, str(ROOT / "scripts"))
import fault_campaign  # noqa: E402


@pytest.mark.slow
def test_killed_training_stages_end_with_the_uninterrupted_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    params = write_params(tmp_path / "tiny.yaml", agent_params_dict(total_env_steps=200))
    table = tmp_path / "table.md"
    for stage in ("train-world-model", "train-agent"):
        fault_campaign.main(["--stage", stage, "--kills", "2", "--seed", "1", "--params", str(params),
                             "--work", str(tmp_path / "work"), "--table", str(table)])
        result = json.loads((tmp_path / "work" / "tiny-Breakout-0" / f"campaign-{stage}-seed1.json").read_text())
        assert result["kills"] == 2 and result["reruns"] >= 2
        assert result["identical"], result["differences"]
        assert not result["missing"]
    rows = table.read_text().splitlines()
    assert len(rows) == 4 and rows[2].startswith("| train-world-model | 2 |") and rows[3].startswith("| train-agent | 2 |")


def test_the_comparison_sees_a_changed_weight(tmp_path: Path) -> None:
    import torch

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    state = {"net": {"w": torch.zeros(3)}, "train_seconds": 1.0}
    torch.save(state, a)
    torch.save({"net": {"w": torch.zeros(3)}, "train_seconds": 2.0}, b)
    excluded: set[str] = set()
    assert fault_campaign.compare_file(a, b, excluded) is None and excluded == {"train_seconds"}
    torch.save({"net": {"w": torch.tensor([0.0, 0.0, 1e-7])}, "train_seconds": 1.0}, b)
    assert fault_campaign.compare_file(a, b, excluded) == ".net.w: tensor differs"
