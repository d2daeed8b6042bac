"""The world model as a batched environment for the actor-critic (docs/architecture.md §3.4).

Every trajectory starts from a real segment of the dataset: L real frames and the L-1 real
actions between them. The reward/termination model's LSTM is warmed up on the L-1 real
transitions; the policy is handed the first L-1 frames to warm up its own LSTM and acts on the
L-th. Each step then asks the diffusion sampler for the next frame given the last L frames and
actions, and the reward/termination model for sign(reward) and termination. A trajectory ends
when termination is predicted or after `horizon` imagined steps (truncation); ended
trajectories are restarted at once from fresh real segments, so the batch stays full.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diamond.data import SegmentSampler
from diamond.models.reward_end import RewardEndModel
from diamond.world_model.sampler import DiffusionSampler


@dataclass
class Restart:
    """Where trajectories (re)start: rows of the batch and the real context the policy burns in on."""

    rows: torch.Tensor  # bool (B,): which rows started a new trajectory
    # float (B, L-1, 3, H, W): frames before the first observation, on the rows of `rows` (others
    # hold zeros); (0, L-1, 3, H, W) when no row restarted. Static shapes: no gather of n rows.
    context_obs: torch.Tensor
    context_mask: torch.Tensor  # bool (B, L-1) or (0, L-1): False on frames padded before an episode start


@dataclass
class ImaginedStep:
    obs: torch.Tensor  # float (B, 3, H, W): next observation to act on (a fresh start on restarted rows)
    reward: torch.Tensor  # float (B,) in {-1, 0, 1}
    terminated: torch.Tensor  # bool (B,)
    truncated: torch.Tensor  # bool (B,)
    final_obs: torch.Tensor  # float (B, 3, H, W): the true next frame, also on rows that ended
    restart: Restart


def categorical(logits: torch.Tensor) -> torch.distributions.Categorical:
    """Categorical(logits=logits) without argument validation: the same samples, log-probs and
    entropies, but validation tests the logits (and each log_prob's value) with `if not
    valid.all()`, a host sync on a GPU, several per imagined step. The logits come from our own
    networks, and the values from the distribution's own samples."""
    return torch.distributions.Categorical(logits=logits, validate_args=False)


class Draws:
    """The random draws of imagination, from torch's global generator: the sampler's noise, and
    the categorical samples of the action ("action"), sign(reward) ("reward") and termination
    ("end"), in the order a step makes them. A seam for tests that replay another code's draws
    (tests/test_official_actor_critic_update.py); the default is the draws as they always were."""

    def noise(self, sampler: DiffusionSampler, obs_buffer: torch.Tensor) -> list[torch.Tensor]:
        return sampler.draw_noise(obs_buffer)

    def sample(self, logits: torch.Tensor, what: str) -> torch.Tensor:
        """A class index (B,) long from `logits` (B, K); `what` names the draw."""
        return categorical(logits).sample()


@dataclass
class Carry:
    """What the actor-critic hands from one update to the next when rows go on across updates
    (params actor_critic.continue_rows_across_updates; official src/coroutines/env_loop.py:24-25,
    where hx and cx are detached at each window's start)."""

    obs: torch.Tensor  # float (B, 3, H, W): the observation to act on next
    hx: torch.Tensor  # (B, D), detached
    cx: torch.Tensor  # (B, D), detached


def _where_rows(rows: torch.Tensor, new: object, old: object) -> object:
    """`new` on the rows where `rows` (B,) is True, `old` elsewhere, for a tensor or a tuple of
    tensors whose batch dimension is the second to last (LSTM states: (layers, B, D))."""
    if isinstance(old, torch.Tensor):
        return torch.where(rows[:, None], new, old)
    return type(old)(_where_rows(rows, n, o) for n, o in zip(new, old))  # type: ignore[arg-type]


class ImaginationEnv:
    """A batch of `batch_size` imagined trajectories; all tensors live on `device`."""

    def __init__(
        self,
        sampler: DiffusionSampler,
        reward_end: RewardEndModel,
        segments: SegmentSampler,
        num_conditioning_frames: int,
        batch_size: int,
        horizon: int,
        device: torch.device,
        compile: bool = False,
    ) -> None:
        if horizon < 1 or batch_size < 1 or num_conditioning_frames < 2:
            raise ValueError(
                f"imagination: horizon={horizon} and batch_size={batch_size} must be >= 1 and "
                f"num_conditioning_frames={num_conditioning_frames} >= 2 (the context needs a real transition)"
            )
        self.sampler = sampler
        self.reward_end = reward_end
        self.segments = segments
        self.context = num_conditioning_frames
        self.batch_size = batch_size
        self.horizon = horizon
        self.device = device
        self.obs_buffer: torch.Tensor | None = None  # (B, L, 3, H, W): the last L frames
        self.act_buffer: torch.Tensor | None = None  # (B, L): the L-1 past actions, then the one to play
        self.reward_state: object = None  # reward/termination LSTM state
        self.steps: torch.Tensor | None = None  # (B,) imagined steps since each row's start
        self.draws = Draws()
        # The actor-critic's side between updates when rows go on across updates; None before
        # the first update, and always when every update restarts all rows.
        self.carry: Carry | None = None
        # params compile_imagination: the step's sampler integration and R in one compiled
        # function (CUDA graphs on a GPU); its random numbers are drawn outside it, in eager's order.
        # fullgraph: a graph break would split the CUDA graph and add host round trips, so one is
        # an error here rather than a silent slowdown (tests/test_compiled_step.py).
        self.compiled = compile
        self._compiled_transition = (
            torch.compile(self._transition, mode="reduce-overhead", fullgraph=True) if compile else None
        )

    def _draw(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Real starts for n rows on `device`: (L frames, L-1 actions, mask)."""
        seg = self.segments.sample(n, self.context - 1).to_torch(device)
        # Padding before an episode start becomes zeros, as the denoiser and R saw it in training.
        return seg.obs * seg.mask[:, :, None, None, None], seg.act, seg.mask

    @torch.no_grad()
    def _warm(self, obs: torch.Tensor, act: torch.Tensor) -> object:
        """The reward/termination LSTM warmed up on the real transitions of the context."""
        return self.reward_end(obs[:, :-1], act, obs[:, 1:], None)[2]

    @torch.no_grad()
    def _start(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
        """Real starts for n rows: (L frames, L-1 actions, mask, warmed reward-model state)."""
        obs, act, mask = self._draw(n, self.device)
        return obs, act, mask, self._warm(obs, act)

    @torch.no_grad()
    def reset(self) -> tuple[torch.Tensor, Restart]:
        """Start every row from a real segment; returns (obs (B, 3, H, W), restart of all rows)."""
        obs, act, mask, state = self._start(self.batch_size)
        self.obs_buffer = obs
        pad = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)
        self.act_buffer = torch.cat([act, pad], dim=1)
        self.reward_state = state
        self.steps = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        rows = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        return obs[:, -1], Restart(rows, obs[:, :-1], mask[:, :-1])

    @torch.no_grad()
    def _transition(
        self, obs_buffer: torch.Tensor, act_buffer: torch.Tensor, noise: list[torch.Tensor], reward_state: object
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
        """The deterministic part of a step: the next frame from the sampler's noise, then R's
        logits and state on the transition (last frame, action played, next frame)."""
        next_obs = self.sampler.integrate(noise, obs_buffer, act_buffer)
        logits_rew, logits_end, state = self.reward_end(
            obs_buffer[:, -1:], act_buffer[:, -1:], next_obs[:, None], reward_state
        )
        return next_obs, logits_rew, logits_end, state

    def _transition_fn(
        self, obs_buffer: torch.Tensor, act_buffer: torch.Tensor, noise: list[torch.Tensor], reward_state: object
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
        """`_transition`, compiled under compile_imagination. Dynamo refuses nn.LSTM (R's) unless
        `allow_rnn` is set while it traces; set here only, around this one function, so that no
        other compiled code of the process changes."""
        if self._compiled_transition is None:
            return self._transition(obs_buffer, act_buffer, noise, reward_state)
        with torch._dynamo.config.patch(allow_rnn=True):
            return self._compiled_transition(obs_buffer, act_buffer, noise, reward_state)

    @torch.no_grad()
    def step(self, action: torch.Tensor) -> ImaginedStep:
        """Play `action` (B,) long in every row."""
        if self.obs_buffer is None or self.act_buffer is None or self.steps is None:
            raise RuntimeError("ImaginationEnv.step called before reset")
        self.act_buffer[:, -1] = action
        noise = self.draws.noise(self.sampler, self.obs_buffer)
        if self.compiled:
            # A new CUDA graph tree step: the last replay's outputs were copied out below, so its
            # buffers may be reused (without this, each call would check for live outputs).
            torch.compiler.cudagraph_mark_step_begin()
        next_obs, logits_rew, logits_end, self.reward_state = self._transition_fn(
            self.obs_buffer, self.act_buffer, noise, self.reward_state
        )
        if self.compiled:  # CUDA graphs reuse their output buffers at the next replay: keep copies
            next_obs, self.reward_state = next_obs.clone(), tuple(s.clone() for s in self.reward_state)
        # Sample sign(reward) in {-1, 0, 1} and termination from the predicted distributions.
        reward = self.draws.sample(logits_rew[:, 0], "reward").float() - 1.0
        terminated = self.draws.sample(logits_end[:, 0], "end").bool()
        self.steps += 1
        truncated = (self.steps >= self.horizon) & ~terminated
        self.obs_buffer = torch.cat([self.obs_buffer[:, 1:], next_obs[:, None]], dim=1)
        self.act_buffer = torch.cat([self.act_buffer[:, 1:], torch.zeros_like(self.act_buffer[:, :1])], dim=1)
        ended = terminated | truncated
        obs = next_obs
        # The one host sync of a step: how many ended rows need a fresh real segment, drawn on the
        # CPU from the dataset in the order of the rows (official src/envs/world_model_env.py
        # reset_dead). Everything else keeps the batch's shape: the n segments are laid into B rows
        # on the CPU, R warms up on all B rows, and torch.where keeps the rows that go on.
        ended_cpu = ended.cpu()
        n = int(ended_cpu.sum())
        context_obs = next_obs.new_zeros((0, self.context - 1, *next_obs.shape[1:]))
        context_mask = torch.zeros(0, self.context - 1, dtype=torch.bool, device=self.device)
        if n:
            new_obs, new_act, new_mask = self._draw(n, torch.device("cpu"))
            full_obs = new_obs.new_zeros((self.batch_size, *new_obs.shape[1:]))
            full_act = new_act.new_zeros((self.batch_size, *new_act.shape[1:]))
            full_mask = new_mask.new_zeros((self.batch_size, *new_mask.shape[1:]))
            full_obs[ended_cpu], full_act[ended_cpu], full_mask[ended_cpu] = new_obs, new_act, new_mask
            full_obs, full_act, full_mask = (x.to(self.device) for x in (full_obs, full_act, full_mask))
            new_state = self._warm(full_obs, full_act)
            self.obs_buffer = torch.where(ended[:, None, None, None, None], full_obs, self.obs_buffer)
            restart_act = torch.cat([full_act, torch.zeros_like(full_act[:, :1])], dim=1)
            self.act_buffer = torch.where(ended[:, None], restart_act, self.act_buffer)
            self.reward_state = _where_rows(ended, new_state, self.reward_state)
            self.steps = torch.where(ended, torch.zeros_like(self.steps), self.steps)
            obs = torch.where(ended[:, None, None, None], full_obs[:, -1], next_obs)
            context_obs, context_mask = full_obs[:, :-1], full_mask[:, :-1]
        return ImaginedStep(obs, reward, terminated, truncated, next_obs, Restart(ended, context_obs, context_mask))

    def state_dict(self) -> dict[str, object] | None:
        """The rows in progress (frames, actions, R's LSTM state, step counters) and the
        actor-critic's carry, for exact resume when rows go on across updates; None before the
        first reset. No restart is ever pending between updates: ended rows restart within the step."""
        if self.obs_buffer is None:
            return None
        # copies: a step changes the buffers in place
        carry = None if self.carry is None else {k: v.clone() for k, v in vars(self.carry).items()}
        return {"obs_buffer": self.obs_buffer.clone(), "act_buffer": self.act_buffer.clone(),  # type: ignore[union-attr]
                "reward_state": tuple(x.clone() for x in self.reward_state),  # type: ignore[union-attr]
                "steps": self.steps.clone(), "carry": carry}  # type: ignore[union-attr]

    def load_state_dict(self, state: dict[str, object] | None) -> None:
        """Restore `state_dict`'s rows (None: no rows yet)."""
        if state is None:
            return
        self.obs_buffer, self.act_buffer = state["obs_buffer"], state["act_buffer"]  # type: ignore[assignment]
        self.reward_state, self.steps = tuple(state["reward_state"]), state["steps"]  # type: ignore[arg-type,assignment]
        self.carry = None if state["carry"] is None else Carry(**state["carry"])  # type: ignore[arg-type]
