"""benchmarks.gpu_smoke at a tiny size on CPU: the real stages run, and the epoch split and the
run projection it reports add up."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_smoke
from diamond.config import load_params


@pytest.mark.slow
def test_gpu_smoke_runs_the_stages_and_projects_the_run(tmp_path):
    gpu_smoke.main(["--config", str(gpu_smoke.ROOT / "params.yaml"), "--preset", "tiny", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "gpu_smoke.json").read_text())
    for stage in ("collect", "train_world_model", "train_agent", "evaluate"):
        assert r[f"stage_{stage}_seconds"] > 0 and r[f"stage_{stage}_peak_rss_mb"] > 0, stage
    smoke = load_params(tmp_path / "params.yaml")
    assert smoke.world_model.denoiser_steps == gpu_smoke.PRESETS["tiny"]["world_model.denoiser_steps"]
    # The measured epoch is the last, a collecting one: every phase ran, and they fit in the epoch.
    assert r["measured_epoch"] == len(r["epochs"]) - 1 == smoke.agent.collect_epochs(smoke.collect.max_steps)
    phases = [r[f"epoch_{k}_s"] for k in gpu_smoke.PHASES]
    assert min(phases) > 0 and sum(phases) <= r["epoch_s"]
    assert r["actor_critic_step_s"] == pytest.approx(r["epoch_actor_critic_s"] / smoke.agent.actor_critic_steps_per_epoch)
    parts = [v for k, v in r.items() if k.startswith("projected_run_hours_") and k != "projected_run_hours_training"]
    assert len(parts) == 7 and r["projected_run_hours"] == pytest.approx(sum(parts))
    assert r["projected_run_hours_training"] == pytest.approx(
        r["projected_run_hours_denoiser"] + r["projected_run_hours_reward_end"] + r["projected_run_hours_actor_critic"])


def test_gpu_smoke_rejects_an_unknown_override(tmp_path):
    with pytest.raises(SystemExit, match="agent.no_such_key"):
        gpu_smoke.main(["--config", str(gpu_smoke.ROOT / "params.yaml"), "--preset", "tiny", "--out", str(tmp_path),
                        "--set", "agent.no_such_key=1"])
