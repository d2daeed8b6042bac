"""Params errors name the full dotted path of the bad key and what is allowed, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_params_dict
from diamond.config import OFFICIAL_BEHAVIOUR, ConfigError, load_params, params_from_dict, to_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(colour="red"), "colour: unknown key; allowed here: actor_critic, agent,"),
        (lambda d: d["world_model"]["denoiser"].update(chanels=[8]), "world_model.denoiser.chanels: unknown key; allowed here:"),
        (lambda d: d["evaluate"].pop("num_envs"), "evaluate.num_envs: missing key"),
        (lambda d: d.pop("released"), "released: missing key"),
        (lambda d: d["evaluate"].update(episodes="ten"), "evaluate.episodes: expected an integer, got 'ten'"),
        (lambda d: d["env"].update(life_counter="always"),
         "env.life_counter: 'always' is not one of 'every_step', 'decreases_only'"),
        (lambda d: d["world_model"].update(training_frames="dark"),
         "world_model.training_frames: 'dark' is not one of 'exact', 'resaved_per_write'"),
        (lambda d: d["released"].update(games=["Tetris"]), "released.games: unknown game 'Tetris'; allowed: Alien,"),
        (lambda d: d["released"].update(filename="models/x.pt"), "released.filename: 'models/x.pt' must contain {game}"),
        (lambda d: d.update(games=[]) or d["released"].update(games=[]), "games and released.games are both empty"),
        # every range is checked when params load, not when the stage that reads it starts
        (lambda d: d["agent"].update(epsilon=1.5), "agent.epsilon: 1.5 must be in [0, 1]"),
        (lambda d: d["world_model"].update(batch_size=0), "world_model.batch_size: 0 must be >= 1"),
        (lambda d: d.update(runs_per_gpu=0), "runs_per_gpu: 0 must be >= 1"),
        (lambda d: d["aggregate"].update(reference_methods=["Dreamer"]), "aggregate.reference_methods: unknown method 'Dreamer'"),
        (lambda d: d["actor_critic"].update(burn_in="sometimes"),
         "actor_critic.burn_in: 'sometimes' is not one of 'detached_masked', 'with_gradient_unmasked'"),
        (lambda d: d["world_model"]["reward_end"].update(segment_length=19),
         "world_model.reward_end.segment_length: derived (actor_critic.horizon + world_model.denoiser.num_conditioning_frames)"),
    ],
)
def test_bad_params_are_one_line_errors_naming_the_key(edit, message: str) -> None:
    d = tiny_params_dict()
    edit(d)
    with pytest.raises(ConfigError) as e:
        params_from_dict(d)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_released_agents_alone_are_a_valid_run() -> None:
    d = tiny_params_dict()
    d["games"], d["released"]["games"] = [], ["Pong"]
    assert params_from_dict(d).released.games == ["Pong"]


def test_reward_end_segment_length_is_derived_from_the_horizon() -> None:
    """As the official config/trainer.yaml derives rew_end_model.training.seq_length."""
    d = tiny_params_dict()
    d["actor_critic"]["horizon"], d["world_model"]["denoiser"]["num_conditioning_frames"] = 7, 3
    p = params_from_dict(d)
    assert p.world_model.reward_end.segment_length == 10
    assert to_dict(p)["world_model"]["reward_end"]["segment_length"] == 10  # hashed and logged with the rest


@pytest.mark.parametrize("config", ["configs/paper.yaml", "configs/released.yaml"])
def test_paper_configs_select_every_official_behaviour(config: str) -> None:
    """Table 1 came from the official code, quirks included (docs/official-parity.md)."""
    data = to_dict(load_params(ROOT / config))
    for key, (official, row) in OFFICIAL_BEHAVIOUR.items():
        assert _dotted(data, key) == official, f"{config}: {key} (row {row}) must be {official!r}"


def test_the_small_default_keeps_our_behaviour() -> None:
    data = to_dict(load_params(ROOT / "params.yaml"))
    for key, (official, row) in OFFICIAL_BEHAVIOUR.items():
        assert _dotted(data, key) != official, f"params.yaml: {key} (row {row}) is the official value"


def _dotted(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data
