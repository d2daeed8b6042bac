"""stages.export_official: our agent checkpoints -> official `Agent` state dicts (the official key
names, order, shapes and dtypes), the inverse of stages.import_official. Real stage processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from agent_helpers import agent_params_dict, agent_paths, prepare_run, run_stage, stage_env
from conftest import ROOT, tiny_params_dict
from diamond.agent.checkpoint import agent_checkpoint, read_agent_checkpoint
from diamond.config import Params, load_params, params_from_dict, to_dict
from diamond.io import ArtifactError, atomic_save_torch
from diamond.models.actor_critic import ActorCritic
from diamond.official.export import to_official
from diamond.world_model.model import build_world_model, world_model_state
from stages.export_official import export
from stages.import_official import convert, read_official
from test_import_official import OFFICIAL, import_official, one_line_error
from test_official_parity import FIXTURE, fixture_params


def export_official(tmp: Path, agent: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "stages.export_official", "--agent", str(agent), "--out", str(out), *extra]
    return subprocess.run(args, cwd=ROOT, env=stage_env(tmp), capture_output=True, text=True, timeout=600)


def assert_same_state(exported: dict, original: dict) -> None:
    """Same keys in the same order, every tensor equal in value, dtype and shape."""
    assert list(exported) == list(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key


def write_agent(path: Path, p: Params, game: str, num_actions: int) -> Path:
    """An agent checkpoint of freshly initialised networks at params `p`."""
    torch.manual_seed(0)
    wm = build_world_model(p.world_model, num_actions, p.env.obs_size, torch.device("cpu"))
    ac = ActorCritic(p.actor_critic, num_actions, p.env.obs_size)
    atomic_save_torch(path, agent_checkpoint(game, 0, num_actions, to_dict(p), ac.state_dict(), world_model_state(wm)))
    return path


def official_tiny_params_dict() -> dict:
    """The tests' tiny params with the settings the official architecture has (32-channel GroupNorm
    groups, no output bias in R); the trained agent stays small."""
    d = agent_params_dict()
    for section in (d["world_model"]["denoiser"], d["world_model"]["reward_end"], d["actor_critic"]):
        section["num_groups_channels"] = 32
    d["world_model"]["reward_end_prior_init"] = False
    return d


def test_import_then_export_gives_back_the_official_file(tmp_path: Path) -> None:
    """tiny_agent.pt (made by the official code) -> import-official's conversion -> the
    export-official command: the same keys in the same order and bit-identical tensors."""
    convert(fixture_params(), "Freeway", 0, read_official(OFFICIAL, "Freeway"), tmp_path / "world_model.pt",
            tmp_path / "agent.pt", {"path": str(OFFICIAL)})
    done = export_official(tmp_path, tmp_path / "agent.pt", tmp_path / "G.pt", "--out-config", str(tmp_path / "G.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "export-official Freeway" in done.stdout and "228 tensors" in done.stdout
    # The official Agent.load reads it with torch.load's default (weights_only) loader.
    assert_same_state(torch.load(tmp_path / "G.pt"), torch.load(OFFICIAL, weights_only=True))
    official_config = torch.load(FIXTURE / "tiny_io.pt", weights_only=True)["config"]
    written = yaml.safe_load((tmp_path / "G.yaml").read_text())
    assert written["denoiser"]["inner_model"]["channels"] == official_config["denoiser"]["inner_model"]["channels"]
    assert written["actor_critic"]["img_size"] == official_config["actor_critic"]["img_size"] == 16


def test_export_has_the_official_keys_and_shapes_at_the_paper_size(tmp_path: Path) -> None:
    official = json.loads((FIXTURE / "paper_keys.json").read_text())
    p = load_params(ROOT / "configs" / "paper.yaml")
    agent = write_agent(tmp_path / "agent.pt", p, "Breakout", official["num_actions"])
    export(agent, tmp_path / "G.pt", tmp_path / "G.yaml")
    state = torch.load(tmp_path / "G.pt", weights_only=True)
    assert list(state) == list(official["keys"])
    assert {k: list(v.shape) for k, v in state.items()} == official["keys"]
    assert {v.dtype for v in state.values()} == {torch.float32}
    # The config written is the official config/agent/default.yaml, with img_size written out.
    config = yaml.safe_load((tmp_path / "G.yaml").read_text())
    assert config["rew_end_model"]["img_size"] == config["actor_critic"]["img_size"] == 64
    for key in ("denoiser", "rew_end_model", "actor_critic"):
        ours, theirs = dict(config[key]), {k: v for k, v in official["config"][key].items() if k != "num_actions"}
        if key == "denoiser":
            ours["inner_model"] = {k: v for k, v in ours["inner_model"].items() if k != "_target_"}
            theirs["inner_model"] = {k: v for k, v in theirs["inner_model"].items() if k != "num_actions"}
        assert {k: v for k, v in ours.items() if k != "_target_"} == theirs, key


@pytest.mark.slow
def test_an_agent_trained_by_the_pipeline_exports_and_imports_back_identically(tmp_path: Path) -> None:
    """collect -> train-world-model -> train-agent at tiny official-architecture params, then
    export-official and import-official: the re-imported networks equal the trained ones."""
    params, run = prepare_run(tmp_path, official_tiny_params_dict(), train_world_model=True)
    done = run_stage("train_agent", params, tmp_path, **agent_paths(run))
    assert done.returncode == 0, done.stderr[-3000:]
    done = export_official(tmp_path, run / "agent.pt", tmp_path / "G.pt")
    assert done.returncode == 0, done.stderr[-3000:]
    back = tmp_path / "back"
    done = import_official(back, params, tmp_path / "G.pt", game="Breakout")
    assert done.returncode == 0, done.stderr[-3000:]
    trained, imported = read_agent_checkpoint(run / "agent.pt", "Breakout"), read_agent_checkpoint(back / "agent.pt", "Breakout")
    assert_same_state(imported["actor_critic"], trained["actor_critic"])
    for network in ("denoiser", "reward_end"):
        assert_same_state(imported["world_model"][network], trained["world_model"][network])


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path: Path) -> None:
    out = tmp_path / "G.pt"
    one_line_error(export_official(tmp_path, OFFICIAL, out), "tiny_agent.pt: not an agent checkpoint of format")
    truncated = tmp_path / "agent.pt"
    truncated.write_bytes(OFFICIAL.read_bytes()[:5000])
    with pytest.raises(ArtifactError, match="agent.pt: corrupt or truncated checkpoint"):
        export(truncated, out, None)
    with pytest.raises(ArtifactError, match="missing.pt: checkpoint not found"):
        export(tmp_path / "missing.pt", out, None)
    assert not out.exists() and not list(tmp_path.glob(".G.pt.*"))


def test_architectures_the_official_code_cannot_express_are_refused(tmp_path: Path) -> None:
    """The small default's R has output biases and its denoiser 16-channel GroupNorm groups."""
    d = tiny_params_dict()
    agent = write_agent(tmp_path / "agent.pt", params_from_dict(d), "Breakout", 4)
    with pytest.raises(ArtifactError, match=r"agent.pt: the official code cannot express this agent: "
                       r"world_model.denoiser.num_groups_channels is 16 \(official: 32\); "
                       r"world_model.reward_end_prior_init is true"):
        export(agent, tmp_path / "G.pt", None)
    d["world_model"]["denoiser"].update(num_groups_channels=32, formulation="ddpm")
    d["world_model"]["reward_end_prior_init"] = False
    agent = write_agent(tmp_path / "agent.pt", params_from_dict(d), "Breakout", 4)
    with pytest.raises(ArtifactError, match=r"formulation is 'ddpm' \(official: 'edm'\)$"):
        export(agent, tmp_path / "G.pt", None)
    assert not (tmp_path / "G.pt").exists()


def test_the_official_code_loaded_an_export_strictly_and_gave_our_outputs() -> None:
    """export_io.pt (fixture README): the official Agent loaded an export of these weights strictly
    and computed these outputs; our export of the same weights holds the same tensors under the
    same keys, and our networks give the same outputs."""
    fixture = torch.load(FIXTURE / "export_io.pt", weights_only=True)
    io = torch.load(FIXTURE / "tiny_io.pt", weights_only=True)
    p = fixture_params()
    models = (build_world_model(p.world_model, 3, p.env.obs_size, torch.device("cpu")), ActorCritic(p.actor_critic, 3, p.env.obs_size))
    denoiser, reward_end, ac = models[0].denoiser, models[0].reward_end, models[1]
    g = torch.Generator().manual_seed(fixture["weights_seed"])
    with torch.no_grad():
        for m in (denoiser, reward_end, ac):
            for v in m.state_dict().values():  # every tensor, in our order (the fixture's recipe)
                v.copy_(fixture["weights_scale"] * torch.randn(v.shape, generator=g))
            m.eval()
        state = to_official({"denoiser": denoiser.state_dict(), "reward_end": reward_end.state_dict(), "actor_critic": ac.state_dict()})
        assert list(state) == fixture["official_keys"]
        sums = torch.tensor([float(v.double().sum()) for v in state.values()], dtype=torch.float64)
        assert torch.equal(sums, fixture["official_sums"])
        for w in "ab":
            denoised = denoiser.denoise(io[f"den_noisy_next_obs_{w}"], io[f"den_sigma_{w}"], io["den_obs"], io["den_act"])
            torch.testing.assert_close(denoised, fixture[f"den_denoised_{w}"], atol=1e-5, rtol=0)
        rew, end, (hx, cx) = reward_end(io["re_obs"], io["re_act"], io["re_next_obs"])
        for name, ours in (("re_logits_rew", rew), ("re_logits_end", end), ("re_hx", hx), ("re_cx", cx)):
            torch.testing.assert_close(ours, fixture[name], atol=1e-5, rtol=0)
        hidden, logits = ac.initial_state(2, "cpu"), []
        for t in range(io["ac_obs"].shape[1]):
            lo, _, hidden = ac(io["ac_obs"][:, t], hidden)
            logits.append(lo)
    torch.testing.assert_close(torch.stack(logits, 1), fixture["ac_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[0], fixture["ac_hx"], atol=1e-5, rtol=0)
