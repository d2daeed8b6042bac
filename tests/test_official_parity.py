"""Official DIAMOND weights load into our networks and give the official outputs.

The fixture (tests/fixtures/official/, recipe in its README) holds an official-format agent state
dict at a tiny config, fixed inputs, and the outputs the official code computed for them, plus the
key names and shapes of the official agent at the paper config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diamond.config import Params, params_from_dict
from diamond.io import ArtifactError
from diamond.models.actor_critic import ActorCritic
from diamond.models.reward_end import RewardEndModel
from diamond.official.keymap import load_official, official_num_actions, split_official
from diamond.world_model.denoiser import Denoiser
from conftest import ROOT, tiny_params_dict

FIXTURE = Path(__file__).parent / "fixtures" / "official"


def fixture_params_dict() -> dict:
    """Our params for the fixture's tiny official config (tiny_io.pt["config"])."""
    d = tiny_params_dict()
    d["env"]["obs_size"] = 16
    d["world_model"]["denoiser"].update(
        num_conditioning_frames=4, cond_channels=16, channels=[16, 32], depths=[1, 2], attention=[False, True],
        num_groups_channels=32, sigma_data=0.5, sigma_offset_noise=0.3,
    )
    d["world_model"]["reward_end"].update(channels=[16, 32], depths=[1, 1], cond_channels=8, lstm_dim=16, num_groups_channels=32)
    d["world_model"]["reward_end_prior_init"] = False
    d["actor_critic"].update(channels=[16, 32], lstm_dim=16, num_groups_channels=32)
    return d


def fixture_params() -> Params:
    return params_from_dict(fixture_params_dict())


def paper_models(p: Params, num_actions: int, obs_size: int) -> tuple[Denoiser, RewardEndModel, ActorCritic]:
    return (
        Denoiser(p.world_model.denoiser, num_actions),
        RewardEndModel(p.world_model.reward_end, num_actions, obs_size, output_bias=p.world_model.reward_end_prior_init),
        ActorCritic(p.actor_critic, num_actions, obs_size),
    )


@pytest.fixture(scope="module")
def tiny() -> tuple[tuple[Denoiser, RewardEndModel, ActorCritic], dict]:
    io = torch.load(FIXTURE / "tiny_io.pt", weights_only=True)
    state = torch.load(FIXTURE / "tiny_agent.pt", weights_only=True)
    assert io["config"]["num_actions"] == official_num_actions(state, "tiny_agent.pt") == 3
    models = paper_models(fixture_params(), 3, 16)
    load_official(state, *models, where="tiny_agent.pt")
    for m in models:
        m.eval()
    return models, io


@pytest.mark.parametrize("which", ["a", "b"])
def test_denoised_estimate_matches_the_official_code(tiny, which: str) -> None:
    (denoiser, _, _), io = tiny
    with torch.no_grad():
        denoised = denoiser.denoise(io[f"den_noisy_next_obs_{which}"], io[f"den_sigma_{which}"], io["den_obs"], io["den_act"])
    torch.testing.assert_close(denoised, io[f"den_denoised_{which}"], atol=1e-5, rtol=0)


def test_reward_end_logits_match_the_official_code(tiny) -> None:
    (_, reward_end, _), io = tiny
    with torch.no_grad():
        rew, end, (hx, cx) = reward_end(io["re_obs"], io["re_act"], io["re_next_obs"])
    torch.testing.assert_close(rew, io["re_logits_rew"], atol=1e-5, rtol=0)
    torch.testing.assert_close(end, io["re_logits_end"], atol=1e-5, rtol=0)
    torch.testing.assert_close(hx, io["re_hx"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cx, io["re_cx"], atol=1e-5, rtol=0)


def test_actor_critic_logits_and_values_match_the_official_code(tiny) -> None:
    (_, _, actor_critic), io = tiny
    state = actor_critic.initial_state(2, "cpu")
    logits, values = [], []
    with torch.no_grad():
        for t in range(io["ac_obs"].shape[1]):
            lo, v, state = actor_critic(io["ac_obs"][:, t], state)
            logits.append(lo)
            values.append(v)
    torch.testing.assert_close(torch.stack(logits, 1), io["ac_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(values, 1), io["ac_values"], atol=1e-5, rtol=0)
    torch.testing.assert_close(state[0], io["ac_hx"], atol=1e-5, rtol=0)


def test_the_key_map_fits_the_paper_config_by_names_and_shapes() -> None:
    """From key names and shapes alone: every official paper-size tensor has a place in our paper-size
    networks, of the same shape, and the parameter counts are the official ones."""
    from diamond.config import load_params

    official = json.loads((FIXTURE / "paper_keys.json").read_text())
    state = {k: torch.zeros(shape) for k, shape in official["keys"].items()}
    p = load_params(ROOT / "configs" / "paper.yaml")
    models = paper_models(p, official["num_actions"], p.env.obs_size)
    parts = split_official(state, "paper_keys.json")
    for name, model in zip(("denoiser", "reward_end", "actor_critic"), models):
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in parts[name].items()} == ours, name
    counts = [sum(x.numel() for x in m.parameters()) for m in models]
    assert counts == [official["parameter_counts"][k] for k in ("denoiser", "rew_end_model", "actor_critic")]
    print(f"paper-size parameters (ours = official): denoiser {counts[0]:,}, reward/termination {counts[1]:,}, "
          f"actor-critic {counts[2]:,}")
    load_official(state, *models, where="paper_keys.json")  # strict


def test_foreign_or_mismatched_state_dicts_are_one_line_errors() -> None:
    state = torch.load(FIXTURE / "tiny_agent.pt", weights_only=True)
    models = paper_models(fixture_params(), 3, 16)
    with pytest.raises(ArtifactError, match="'fc.weight' is not under denoiser."):
        load_official({"fc.weight": torch.zeros(2)}, *models, where="x.pt")
    without_ac = {k: v for k, v in state.items() if not k.startswith("actor_critic.")}
    with pytest.raises(ArtifactError, match="no actor_critic weights"):
        load_official(without_ac, *models, where="x.pt")
    missing = {k: v for k, v in state.items() if k != "rew_end_model.lstm.weight_hh_l0"}
    with pytest.raises(ArtifactError, match="reward_end weights do not fit.*missing 'lstm.weight_hh_l0'"):
        load_official(missing, *models, where="x.pt")
    wider = paper_models(fixture_params(), 4, 16)  # a game with another action count
    with pytest.raises(ArtifactError, match=r"denoiser.act_emb.weight has shape \(3, 4\), this architecture \(4, 4\)"):
        load_official(state, *wider, where="x.pt")
