"""Two actor-critic updates in imagination match the official code's, draw for draw.

The fixture `tests/fixtures/official/tiny_ac_update.pt` (recipe: tests/fixtures/official/README.md)
holds two updates of the official env loop (src/coroutines/env_loop.py) over the official
WorldModelEnv (src/envs/world_model_env.py), with the loss of src/models/actor_critic.py and the
optimiser step of src/trainer.py `train_component` (AdamW of src/utils.py `configure_opt`,
gradient clipping at 100), from the tiny official weights (`tiny_agent.pt`). The starts, the
sampler's noise and the action, reward and termination draws the official run made are replayed
into ours, which runs its own training path: `ImaginationEnv`, `imagine_window`, the loss of
`imagination_loss`, `lambda_returns` and `Trainer`, with the official switches of rows A8 and A9
(docs/official-parity.md). Rows die in the first window (a mid-window restart and burn-in) and one
row started in the first window is truncated at the first step of the second: rows go on across
updates. Both runs take their steps past the learning-rate warm-up (official LambdaLR advanced
100 steps; our Trainer's step count set to its warm-up), so the comparison does not involve row O3.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from diamond.agent.imagination import Draws, ImaginationEnv, ImaginedStep
from diamond.agent.policy import _combine, imagine_window
from diamond.data.sampler import Segment
from diamond.official.keymap import load_official, map_key
from diamond.training import Trainer
from diamond.world_model.model import make_sampler
from test_official_parity import FIXTURE, fixture_params_dict, paper_models

from diamond.config import params_from_dict

UPDATE = FIXTURE / "tiny_ac_update.pt"


class InjectedStarts:
    """The fixture's starts, handed out in order as `SegmentSampler.sample` would hand its draws."""

    def __init__(self, obs_u8: torch.Tensor, act: torch.Tensor) -> None:
        self.obs, self.act, self.used = obs_u8.numpy(), act.numpy(), 0

    def sample(self, n: int, num_steps: int) -> Segment:
        assert num_steps == self.act.shape[1], num_steps
        k, self.used = self.used, self.used + n
        assert self.used <= len(self.obs), "ran out of the official run's starts"
        zeros = np.zeros((n, num_steps))
        return Segment(self.obs[k:self.used], self.act[k:self.used], zeros.astype(np.float32), zeros.astype(bool),
                       zeros.astype(bool), np.ones((n, num_steps + 1), dtype=bool))


class ReplayedDraws(Draws):
    """The official run's draws, step after step."""

    def __init__(self, fixture: dict) -> None:
        self.fixture, self.count = fixture, {"noise": 0, "action": 0, "reward": 0, "end": 0}

    def noise(self, sampler, obs_buffer: torch.Tensor) -> list[torch.Tensor]:
        k = self.count["noise"]
        self.count["noise"] += 1
        return [self.fixture["noise"][:, k].clone()]  # s_churn = 0: the start x is the only draw

    def sample(self, logits: torch.Tensor, what: str) -> torch.Tensor:
        k = self.count[what]
        self.count[what] += 1
        drawn = {"action": self.fixture["action"], "reward": self.fixture["reward"] + 1, "end": self.fixture["end"]}[what]
        return drawn[:, k].long()


class RecordingEnv(ImaginationEnv):
    """Our environment, keeping each step's true next frame (`final_obs`) for the check."""

    final_frames: list[torch.Tensor]

    def step(self, action: torch.Tensor) -> ImaginedStep:
        out = super().step(action)
        self.final_frames.append(out.final_obs.clone())
        return out


@pytest.fixture(scope="module")
def official() -> dict:
    return torch.load(UPDATE, weights_only=True)


@pytest.fixture(scope="module")
def ours(official: dict) -> list[dict]:
    """Our two updates on the official run's draws: per update the window, returns, losses, weights."""
    c = official["config"]
    d = fixture_params_dict()
    d["world_model"]["denoiser"]["quantization"] = "truncate"  # src/models/diffusion/denoiser.py denoise
    d["world_model"]["sampler"].update(num_steps=c["denoising_steps"], sigma_min=2e-3, sigma_max=5.0, rho=7.0, order=1,
                                       s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, quantize=True,
                                       initial_noise="unit")
    d["actor_critic"].update(horizon=c["horizon"], batch_size=c["batch_size"], gamma=c["gamma"], lambda_=c["lambda"],
                             entropy_weight=c["weight_entropy_loss"], value_loss_weight=c["weight_value_loss"],
                             continue_rows_across_updates=True, burn_in="with_gradient_unmasked",
                             optimizer=dict(lr=c["lr"], eps=c["eps"], weight_decay=c["weight_decay"],
                                            warmup_steps=c["warmup_steps"], warmup_starts_at_zero=True, max_grad_norm=c["max_grad_norm"]))
    d["actor_critic"]["lambda"] = d["actor_critic"].pop("lambda_")
    p = params_from_dict(d)
    denoiser, reward_end, ac = paper_models(p, 3, 16)
    load_official(torch.load(FIXTURE / "tiny_agent.pt", weights_only=True), denoiser, reward_end, ac, where="tiny_agent.pt")
    denoiser.eval()
    reward_end.eval()
    starts = InjectedStarts(official["starts_obs_u8"], official["starts_act"])
    env = RecordingEnv(make_sampler(denoiser, p.world_model), reward_end, starts,  # type: ignore[arg-type]
                         p.world_model.denoiser.num_conditioning_frames, c["batch_size"], c["horizon"], torch.device("cpu"))
    env.draws, env.final_frames = ReplayedDraws(official), []
    trainer = Trainer(ac, p.actor_critic.optimizer)
    trainer.num_steps = c["warmup_steps"]  # past the warm-up, as the official scheduler (module docstring)
    ac.train()
    out = []
    for _ in range(c["updates"]):
        window = imagine_window(ac, env, p.actor_critic)
        returns = window.lambda_returns(p.actor_critic)
        valid = torch.ones_like(window.values, dtype=torch.bool)
        loss, metrics = _combine(p.actor_critic, window.log_probs, window.entropies, window.values, returns, valid)
        step = trainer.step(loss)
        out.append({"window": window, "returns": returns, "loss": loss.detach(), "metrics": metrics, **step,
                    "weights": {k: v.clone() for k, v in ac.state_dict().items()}})
    out.append({"frames": torch.stack(env.final_frames, 1), "starts_used": starts.used, "draws": env.draws.count})
    return out


def test_the_replayed_run_is_the_official_one(official: dict, ours: list[dict]) -> None:
    """Every start and draw was used, rows died inside the windows and a row went on across the
    updates, and each imagined frame is the official sampler's (ours from the same noise)."""
    frames, steps = ours[-1]["frames"], official["noise"].shape[1]
    assert ours[-1]["starts_used"] == len(official["starts_obs_u8"])
    assert ours[-1]["draws"] == {"noise": steps, "action": steps, "reward": steps, "end": steps}
    first, second = official["updates"]
    assert first["end"][:, :-1].any() and second["trunc"][:, 0].any()
    torch.testing.assert_close(frames, official["next_obs"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("u", [0, 1])
def test_window_and_lambda_returns_match_the_official_env_loop(official: dict, ours: list[dict], u: int) -> None:
    o, w = official["updates"][u], ours[u]["window"]
    torch.testing.assert_close(w.rewards, o["rew"], atol=0, rtol=0)
    torch.testing.assert_close(w.terminated, o["end"].bool(), atol=0, rtol=0)
    torch.testing.assert_close(w.truncated, o["trunc"].bool() & ~o["end"].bool(), atol=0, rtol=0)
    dist = torch.distributions.Categorical(logits=o["logits"])
    torch.testing.assert_close(w.log_probs.detach(), dist.log_prob(o["act"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.entropies.detach(), dist.entropy(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.values.detach(), o["values"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.next_values, o["val_bootstrap"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[u]["returns"], o["lambda_returns"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("u", [0, 1])
def test_losses_match_the_official_loss(official: dict, ours: list[dict], u: int) -> None:
    o, m, c = official["updates"][u], ours[u]["metrics"], official["config"]
    torch.testing.assert_close(m["loss_actor"], o["loss_actions"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m["loss_value"] * c["weight_value_loss"], o["loss_values"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m["entropy"], o["entropy"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(-c["weight_entropy_loss"] * m["entropy"], o["loss_entropy"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[u]["loss"], o["loss_total"], atol=1e-5, rtol=1e-5)
    assert ours[u]["grad_norm"] == pytest.approx(float(o["grad_norm"]), rel=1e-5)


@pytest.mark.parametrize("u", [0, 1])
def test_weights_after_the_optimiser_step_match_the_official_ones(official: dict, ours: list[dict], u: int) -> None:
    """Every tensor of the actor-critic after the AdamW step (official names), to 1e-5."""
    theirs, mine = official["updates"][u]["weights_after"], ours[u]["weights"]
    assert sorted(map_key("actor_critic", k) for k in theirs) == sorted(mine)
    before = torch.load(FIXTURE / "tiny_agent.pt", weights_only=True)
    for k, v in theirs.items():
        torch.testing.assert_close(mine[map_key("actor_critic", k)], v, atol=1e-5, rtol=1e-5, msg=lambda e, k=k: f"{k}: {e}")
    moved = max((v - before[f"actor_critic.{k}"]).abs().max().item() for k, v in theirs.items())
    assert moved > 5e-4  # lr 1e-3: the steps moved the weights far beyond the tolerance
