"""scripts/bad_input_campaign.py, short version: every malformed params value, unknown or missing
key, damaged dataset and wrong checkpoint is a one-line error naming what is wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bad_input_campaign as campaign  # noqa: E402


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "params.yaml"], ids=lambda p: p.name)
def test_every_shipped_config_loads(config: Path) -> None:
    campaign.params_from_dict(yaml.safe_load(config.read_text()))


def test_bad_inputs_are_caught_in_one_line(tmp_path: Path) -> None:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    outcomes = campaign.params_cases(base, quick=True) + campaign.artifact_cases(base, tmp_path)
    assert all(o.one_line for o in outcomes)
    for o in outcomes:
        if "(wrong type)" in o.case or o.case.startswith(("unknown key", "missing key")):
            key = o.case.split("`")[1]
            assert o.caught == "load" and o.message.startswith(key), o
        if o.case.startswith(("dataset:", "world-model checkpoint:", "agent checkpoint:")):
            assert o.caught == "load", o
    negative = [o for o in outcomes if o.case.endswith("(negative)") and o.caught == "ACCEPTED"]
    assert {o.case.split("`")[1] for o in negative} <= {"world_model.denoiser.train_log_sigma_loc"}
