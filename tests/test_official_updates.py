"""Training updates of D and R reproduce the official trainer's, step for step.

The fixtures (tests/fixtures/official/tiny_updates_{denoiser,reward_end}.pt, recipe in that
folder's README) hold what the official `Trainer.train_component` (src/trainer.py:349-389) did to
the tiny agent of tiny_agent.pt in 3 updates on a fixed batch: the losses, the gradient norms
before clipping, the learning rates and every tensor's change, with the paper's optimiser settings
(AdamW lr 1e-4, eps 1e-8, weight decay 1e-2 in `configure_opt`'s groups, LambdaLR warm-up over
100 steps, gradient clipping at 1.0 for D and 100 for R). Here the same batch goes through our
`diamond.training.training_step`, the function train-world-model steps D and R with, on the world
model `build_world_model` makes from configs/paper.yaml's optimiser sections.

The official warm-up gives the first update lr 0 (row O3 of docs/official-parity.md), so after
one step the weights are unchanged and after three they moved by about 3e-6. A tolerance on the
weights alone could not fail, so the changes themselves are compared, to 1e-2 of the largest
official change of each tensor plus the weight's float32 rounding (`assert_changes_match`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diamond.config import params_from_dict
from diamond.data.sampler import Segment
from diamond.models.actor_critic import ActorCritic
from diamond.official.keymap import load_official, map_key
from diamond.training import training_step, weight_decay_groups
from diamond.world_model.model import WorldModel, build_world_model, load_world_model, save_world_model
from conftest import ROOT
from test_official_parity import fixture_params_dict

FIXTURE = Path(__file__).parent / "fixtures" / "official"
PAPER_OPTIMISERS = ("denoiser_optimizer", "reward_end_optimizer")


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the same reduction order on every machine, and no oversubscription of shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def paper_update_params(warmup_starts_at_zero: bool | None = None, padded_target_feedback: str | None = None) -> dict:
    """The tiny official config with the paper's training settings: D's autoregressive step,
    truncating quantization and configs/paper.yaml's `padded_target_feedback` (unless given), and
    configs/paper.yaml's optimisers (`warmup_starts_at_zero` as there unless given)."""
    d = fixture_params_dict()
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    d["world_model"]["denoiser"].update(
        formulation="edm", num_autoregressive_steps=1, quantization="truncate",
        padded_target_feedback=padded_target_feedback or paper["world_model"]["denoiser"]["padded_target_feedback"],
    )
    for name in PAPER_OPTIMISERS:
        d["world_model"][name] = copy.deepcopy(paper["world_model"][name])
        if warmup_starts_at_zero is not None:
            d["world_model"][name]["warmup_starts_at_zero"] = warmup_starts_at_zero
    return d


def official_world_model(warmup_starts_at_zero: bool | None = None, padded_target_feedback: str | None = None) -> WorldModel:
    """Our world model at the tiny config, holding tiny_agent.pt's weights."""
    p = params_from_dict(paper_update_params(warmup_starts_at_zero, padded_target_feedback))
    wm = build_world_model(p.world_model, 3, 16, torch.device("cpu"))
    state = torch.load(FIXTURE / "tiny_agent.pt", weights_only=True)
    load_official(state, wm.denoiser, wm.reward_end, ActorCritic(p.actor_critic, 3, 16), where="tiny_agent.pt")
    return wm


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURE / f"tiny_updates_{name}.pt", weights_only=True)


def ours_change(official_change: dict[str, torch.Tensor], network: str) -> dict[str, torch.Tensor]:
    """The official per-tensor changes under our key names."""
    official_name = {"denoiser": "denoiser", "reward_end": "rew_end_model"}[network]
    return {map_key(official_name, k): v for k, v in official_change.items()}


def denoiser_segment(fx: dict) -> Segment:
    """The official batch as our Segment: 6 frames, 5 steps (the official 6th action is unused)."""
    b, t = fx["act"].shape
    return Segment(
        obs=fx["obs_uint8"].numpy(), act=fx["act"][:, : t - 1].numpy(), rew=np.zeros((b, t - 1), np.float32),
        terminated=np.zeros((b, t - 1), bool), truncated=np.zeros((b, t - 1), bool), mask=fx["mask"].numpy(),
    ).to_torch()


def reward_end_segment(fx: dict) -> Segment:
    """The official 19-frame batch (18 transitions) as our Segment of 18 steps. Where the official
    loss puts `final_observation` as the next frame of a terminal step, our episodes store that
    frame (docs/official-parity.md, C8): it becomes a real frame of the segment."""
    obs, mask = fx["obs_uint8"].clone(), fx["mask"].clone()
    t = obs.shape[1] - 1
    for b, e in zip(*torch.nonzero(fx["end"][:, :t], as_tuple=True)):
        obs[b, e + 1], mask[b, e + 1] = fx["final_obs_uint8"], True
    return Segment(
        obs=obs.numpy(), act=fx["act"][:, :t].numpy(), rew=fx["rew"][:, :t].numpy(),
        terminated=fx["end"][:, :t].bool().numpy(), truncated=np.zeros_like(fx["end"][:, :t].bool().numpy()),
        mask=mask.numpy(),
    ).to_torch()


def inject_draws(wm: WorldModel, fx: dict) -> Iterator[None]:
    """D draws the fixture's sigma, pixel noise and offset noise, target after target."""
    draws = iter([(fx["sigma"][s, i], fx["eps"][s, i], fx["offset_normal"][s, i])
                  for s in range(fx["sigma"].shape[0]) for i in range(fx["sigma"].shape[1])])
    wm.denoiser.edm_training_draws = lambda target_obs: next(draws)  # type: ignore[method-assign]
    return draws


def run_updates(wm: WorldModel, network: str, fx: dict) -> tuple[list[dict[str, float]], dict, dict, dict]:
    """3 updates through training_step: (metrics per step, weights before, after 1, after 3)."""
    model = wm.denoiser if network == "denoiser" else wm.reward_end
    trainer = wm.denoiser_trainer if network == "denoiser" else wm.reward_end_trainer
    seg = denoiser_segment(fx) if network == "denoiser" else reward_end_segment(fx)
    snapshot = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731
    model.train()
    before, metrics = snapshot(), [training_step(trainer, model.compute_loss, seg)]
    after1 = snapshot()
    metrics += [training_step(trainer, model.compute_loss, seg) for _ in range(fx["steps"] - 1)]
    return metrics, before, after1, snapshot()


def assert_changes_match(before: dict, after: dict, official: dict[str, torch.Tensor]) -> None:
    """Every tensor within 1e-5 of the official one, and its change within 1e-3 of the tensor's
    largest official change (Adam magnifies the rounding of gradients near
    zero, such as those of attention key biases, which softmax ignores) plus 2 float32 rounding steps of the weight (a change is the difference
    of two weights of about 0.1, known to about 1e-8)."""
    assert official.keys() == before.keys()
    for k, expected in official.items():
        torch.testing.assert_close(after[k], before[k] + expected, atol=1e-5, rtol=1e-5, msg=k)
        error = (after[k] - before[k] - expected).abs()
        bound = 1e-2 * expected.abs().max() + 2 * torch.finfo(torch.float32).eps * before[k].abs()
        worst = int((error - bound).argmax())
        assert bool((error <= bound).all()), (
            f"{k}: change off by {float(error.flatten()[worst]):.3g} (allowed {float(bound.flatten()[worst]):.3g})"
        )


@pytest.mark.parametrize("network", ["denoiser", "reward_end"])
def test_updates_match_the_official_trainer(network: str) -> None:
    fx = load_fixture(network)
    wm = official_world_model()
    cfg = (wm.denoiser_trainer if network == "denoiser" else wm.reward_end_trainer).cfg
    official = fx["optimizer"], fx["training"]
    assert (cfg.lr, cfg.eps, cfg.weight_decay) == (official[0]["lr"], official[0]["eps"], official[0]["weight_decay"])
    assert (cfg.warmup_steps, cfg.max_grad_norm) == (official[1]["lr_warmup_steps"], official[1]["max_grad_norm"])
    assert cfg.warmup_starts_at_zero  # configs/paper.yaml's value
    if network == "denoiser":
        draws = inject_draws(wm, fx)
    metrics, before, after1, after3 = run_updates(wm, network, fx)
    if network == "denoiser":
        assert next(draws, None) is None  # every injected draw was used, none twice
    for step, m in enumerate(metrics):
        assert m["loss"] == pytest.approx(float(fx["loss"][step]), abs=1e-5), step
        assert m["grad_norm"] == pytest.approx(float(fx["grad_norm"][step]), rel=1e-5), step
        assert m["lr"] == pytest.approx(float(fx["lr"][step]), rel=1e-12, abs=0), step
        if network == "reward_end":
            assert m["loss_rew"] == pytest.approx(float(fx["loss_rew"][step]), abs=1e-5)
            assert m["loss_end"] == pytest.approx(float(fx["loss_end"][step]), abs=1e-5)
    # The official first update has lr 0: nothing moves, AdamW only fills its moments.
    assert float(fx["max_abs_change_after_1"]) == 0.0
    for k in before:
        assert torch.equal(after1[k], before[k]), k
    assert_changes_match(before, after3, ours_change(fx["change_after_3"], network))


def test_a_padded_first_target_feeds_back_the_official_estimate() -> None:
    """tiny_updates_denoiser_padded_target.pt: the batch of tiny_updates_denoiser.pt but for its
    third segment, whose first target is padding too (only the second target is real), as the
    official placement makes at an episode start (docs/official-parity.md C7, C8). The official
    forward feeds D's estimate of that padding target into the second target's context
    (src/models/diffusion/denoiser.py:101,119): `padded_target_feedback: estimate` reproduces its
    three updates (row D2)."""
    fx = load_fixture("denoiser_padded_target")
    assert fx["mask"][:, 4].tolist() == [True, True, False] and bool(fx["mask"][:, 5].all())
    wm = official_world_model(padded_target_feedback="estimate")
    draws = inject_draws(wm, fx)
    metrics, before, _, after3 = run_updates(wm, "denoiser", fx)
    assert next(draws, None) is None
    for step, m in enumerate(metrics):
        assert m["loss"] == pytest.approx(float(fx["loss"][step]), abs=1e-5), step
        assert m["grad_norm"] == pytest.approx(float(fx["grad_norm"][step]), rel=1e-5), step
    assert_changes_match(before, after3, ours_change(fx["change_after_3"], "denoiser"))


def test_zeroed_padded_target_feedback_misses_the_official_update() -> None:
    """Ours (`zeroed`: the padding target's estimate is masked to zeros like all padding) gives the
    second target of the third segment another context, and with it another loss from the first
    update on, beyond the tolerance above: the comparison can fail."""
    fx = load_fixture("denoiser_padded_target")
    wm = official_world_model(padded_target_feedback="zeroed")
    inject_draws(wm, fx)
    metrics, *_ = run_updates(wm, "denoiser", fx)
    assert abs(metrics[0]["loss"] - float(fx["loss"][0])) > 1e-4


def test_our_warmup_moves_the_first_step_and_misses_the_official_changes() -> None:
    """Without the switch (ours: lr*(k+1)/warmup) the first update moves R and the changes after
    three differ from the official ones beyond the tolerance above: the comparison can fail."""
    fx = load_fixture("reward_end")
    metrics, before, after1, after3 = run_updates(official_world_model(warmup_starts_at_zero=False), "reward_end", fx)
    assert [m["lr"] for m in metrics] == pytest.approx([1e-6, 2e-6, 3e-6])
    assert any(not torch.equal(after1[k], before[k]) for k in before)
    with pytest.raises(AssertionError):
        assert_changes_match(before, after3, ours_change(fx["change_after_3"], "reward_end"))


@pytest.mark.parametrize(("starts_at_zero", "expected"), [(True, [0.0, 1e-6, 9.9e-5, 1e-4, 1e-4]),
                                                            (False, [1e-6, 2e-6, 1e-4, 1e-4, 1e-4])])
def test_warmup_schedule(starts_at_zero: bool, expected: list[float]) -> None:
    """Steps 0, 1, 99, 100, 150 of a 100-step warm-up to lr 1e-4: the official LambdaLR
    (src/utils.py:177-181) reaches the full rate one step later than ours."""
    trainer = official_world_model(starts_at_zero).reward_end_trainer
    assert [trainer.lr_at(k) for k in (0, 1, 99, 100, 150)] == pytest.approx(expected, rel=1e-12, abs=0)


def test_the_official_warmup_resumes_exactly(tmp_path: Path) -> None:
    """3 updates, the world-model checkpoint written and read back (train-world-model's resume
    path), 2 more: the same weights as 5 straight updates, since the rate follows the saved
    step count."""
    fx = load_fixture("reward_end")
    seg = reward_end_segment(fx)

    def updates(wm: WorldModel, n: int) -> WorldModel:
        wm.reward_end.train()
        for _ in range(n):
            training_step(wm.reward_end_trainer, wm.reward_end.compute_loss, seg)
        return wm

    straight = updates(official_world_model(), 5)
    save_world_model(tmp_path / "wm.pt", updates(official_world_model(), 3))
    resumed = updates(load_world_model(tmp_path / "wm.pt", torch.device("cpu"), straight.cfg), 2)
    assert resumed.reward_end_steps == straight.reward_end_steps == 5
    for k, v in straight.reward_end.state_dict().items():
        assert torch.equal(resumed.reward_end.state_dict()[k], v), k


def test_weight_decay_groups_are_the_official_ones() -> None:
    """The parameters in each AdamW group, by name, are those of the official configure_opt
    (src/utils.py:129-166) for all three networks (tiny_weight_decay_groups.json). The update
    comparisons above cannot tell the groups apart: at lr 2e-6 a decay of 1e-2 moves a weight of
    0.1 by 2e-9, below float32 resolution."""
    official = json.loads((FIXTURE / "tiny_weight_decay_groups.json").read_text())
    p = params_from_dict(paper_update_params())
    wm = build_world_model(p.world_model, 3, 16, torch.device("cpu"))
    networks = {"denoiser": wm.denoiser, "rew_end_model": wm.reward_end, "actor_critic": ActorCritic(p.actor_critic, 3, 16)}
    for name, model in networks.items():
        ids = {id(q): n for n, q in model.named_parameters()}
        decay, no_decay = weight_decay_groups(model)
        assert {ids[id(q)] for q in decay} == {map_key(name, n) for n in official[name]["decay"]}, name
        assert {ids[id(q)] for q in no_decay} == {map_key(name, n) for n in official[name]["no_decay"]}, name
