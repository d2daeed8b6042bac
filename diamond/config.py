"""Typed configuration, read from `params.yaml` alone.

Every knob of the method lives in one dataclass below, named as in the paper. There are no
defaults here: `params.yaml` (small scale) and `configs/paper.yaml` (the paper's scale) give
every value, and a missing, unknown or mistyped key is a one-line error naming the key. Every
range and cross-field check happens here, when params load (`RANGE_RULES`, `_validate`), so a bad
value fails before `collect` runs, not when the stage that reads it starts.

Derived facts are not params keys: `world_model.reward_end.segment_length` is
`actor_critic.horizon + world_model.denoiser.num_conditioning_frames`, as the official code
derives it (config/trainer.yaml: `rew_end_model.training.seq_length:
${world_model_env.horizon} + ${agent.denoiser.inner_model.num_steps_conditioning}`); it is filled
in when params load (`DERIVED`) and appears in `to_dict` (so hashes and logged params hold it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diamond.env.games import ATARI_100K_GAMES, REFERENCE_METHODS


class ConfigError(ValueError):
    """A malformed params file: the message names the bad key or value and what is allowed."""


@dataclass(frozen=True)
class EnvConfig:
    """Atari 100k protocol (docs/architecture.md §2)."""

    frame_skip: int  # action repeat, max-pooled over the last two raw frames
    max_noops: int  # 1..max_noops random no-ops at reset
    max_episode_frames: int  # truncation, in raw frames (108,000)
    obs_size: int  # square RGB observations
    # When a training episode sees a life loss (row P8, docs/official-parity.md): "every_step" =
    # the life counter follows ale.lives() at every step, so every decrease is a loss;
    # "decreases_only" = it is updated only when lives decrease (official
    # src/envs/atari_preprocessing.py:76-78), so the first loss after an extra life is not seen.
    life_counter: str


@dataclass(frozen=True)
class CollectConfig:
    """Initial collection with the uniform policy (docs/architecture.md §3.5)."""

    min_steps: int
    max_steps: int
    chunk_steps: int
    min_minority_rewards: int  # stop once the minority reward classes hold this many


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up and gradient clipping (docs/architecture.md §3.5)."""

    lr: float
    eps: float
    weight_decay: float
    warmup_steps: int
    # Step k (0-based) of the warm-up uses lr*k/warmup_steps, so the first update has lr 0, as the
    # official LambdaLR (src/utils.py:177-181; docs/official-parity.md, row O3); false: lr*(k+1)/warmup_steps.
    warmup_starts_at_zero: bool
    max_grad_norm: float


@dataclass(frozen=True)
class DenoiserConfig:
    """EDM denoiser D and its U-Net F (docs/architecture.md §3.2)."""

    # "edm" (the paper) or "ddpm" (its section 5.1 ablation as the official `ddpm` branch does it:
    # epsilon prediction, offset noise, diffusers DDPMScheduler sampling; see diamond/world_model/ddpm.py).
    formulation: str
    num_conditioning_frames: int  # L = 4
    cond_channels: int  # conditioning vector size (256)
    channels: list[int]  # U-Net channels per level
    depths: list[int]  # residual blocks per level
    attention: list[bool]  # self-attention per level
    num_groups_channels: int  # GroupNorm group size in channels (32)
    sigma_data: float
    sigma_offset_noise: float
    train_log_sigma_loc: float
    train_log_sigma_scale: float
    train_sigma_min: float
    train_sigma_max: float
    ddpm_num_timesteps: int  # DDPM only: T of the linear beta schedule (official ddpm branch: 1000)
    # Extra training targets per segment fed back from D's own one-shot estimate (official
    # denoiser.training.num_autoregressive_steps, config/trainer.yaml: 1); 0 = teacher forcing only.
    num_autoregressive_steps: int
    # 8-bit quantization of denoised estimates (sampler and autoregressive feedback): "nearest"
    # (round) or "truncate" (the official `.byte()`, src/models/diffusion/denoiser.py).
    quantization: str
    # Where D's training segments and the imagination starts (D's first context) end
    # (diamond/data/sampler.py Placement). segment_end: "uniform" (ours) or "clipped", the official
    # end min(len, t + 1 + U{0..n-1}) (src/data/batch_sampler.py:56,64-68; docs/official-parity.md C7).
    segment_end: str
    # segment_frames: "with_final" (ours: last frames obs[1..T]) or "without_final" (official:
    # obs[0..T-1], the T frames an official episode stores, src/coroutines/collector.py:73-74;
    # docs/official-parity.md C8, D3).
    segment_frames: str
    # padded_target_feedback: what a padding target (before the episode start) puts into the next
    # target's context: "zeroed" (ours: zeros, as all padding) or "estimate" (official: D's
    # estimate of it, unmasked, src/models/diffusion/denoiser.py:101,119; docs/official-parity.md D2).
    padded_target_feedback: str

    @property
    def training_segment_steps(self) -> int:
        """Steps per D training segment: L context steps plus one per autoregressive target
        (official src/trainer.py: L + 1 + num_autoregressive_steps frames)."""
        return self.num_conditioning_frames + self.num_autoregressive_steps


@dataclass(frozen=True)
class SamplerConfig:
    """Karras schedule and Euler/Heun solver (docs/architecture.md §3.2). With denoiser formulation "ddpm" only
    num_steps and quantize apply (diamond/world_model/ddpm.py, `DDPMSampler`)."""

    num_steps: int
    sigma_min: float
    sigma_max: float
    rho: float
    order: int  # 1 = Euler, 2 = Heun
    s_churn: float
    s_tmin: float
    s_tmax: float
    s_noise: float
    quantize: bool  # 8-bit quantization of the denoised estimate
    # Start of sampling: "unit" = N(0, I) (official src/models/diffusion/diffusion_sampler.py) or
    # "sigma_max" = sigma_max * N(0, I) (standard EDM).
    initial_noise: str


@dataclass(frozen=True)
class RewardEndConfig:
    """Reward/termination model R (docs/architecture.md §3.3)."""

    channels: list[int]
    depths: list[int]
    cond_channels: int
    num_groups_channels: int  # GroupNorm group size in channels (32)
    lstm_dim: int
    # R's training segments: "ends_at_step" (ours: 19 steps ending at the sampled step, padding only
    # before the start, a transition learnt where both its frames are real) or "both_sides" (official,
    # src/data/batch_sampler.py:59-61, src/models/rew_end_model.py:57-69: a window of segment_length
    # frames with the sampled step at a uniform position, padded on both sides; the final frame only
    # as a terminal next frame, grey padding after the last step of an episode not terminated;
    # docs/official-parity.md C3, R7).
    segment_window: str
    # Derived, not a params key (see the module docstring): actor_critic.horizon +
    # denoiser.num_conditioning_frames (19). A saved config (checkpoint) carries its value.
    segment_length: int = dataclasses.field(default=0, metadata={"derived": True})


@dataclass(frozen=True)
class WorldModelConfig:
    """The first epoch's world-model training (stage train-world-model)."""

    denoiser: DenoiserConfig
    sampler: SamplerConfig
    reward_end: RewardEndConfig
    denoiser_optimizer: OptimizerConfig
    reward_end_optimizer: OptimizerConfig
    batch_size: int
    denoiser_steps: int  # first epoch: 10,000
    reward_end_steps: int  # first epoch: 10,000
    # Start R's reward and termination heads at the dataset's log class frequencies (output biases)
    # instead of PyTorch's default init. Not in the paper or the official code (false in
    # configs/paper.yaml). At 32x32, R otherwise spends its first thousands of steps at the
    # majority class: rewards are 2% of Assault's steps and must first be learned as a prior.
    reward_end_prior_init: bool
    # Frames D, R and the imagination starts read (row C9, docs/official-parity.md): "exact" = the
    # emulator's uint8; "resaved_per_write" = as the official code reads them back after each
    # episode write's truncating `.byte()` (src/data/episode.py:48), compounded once per write
    # (diamond/data/resave.py). The stored frames stay exact either way.
    training_frames: str
    checkpoint_every_steps: int
    log_every_steps: int


@dataclass(frozen=True)
class ActorCriticConfig:
    """Actor-critic trained in imagination (docs/architecture.md §3.4)."""

    channels: list[int]  # encoder channels per level (each level max-pools by 2)
    num_groups_channels: int  # GroupNorm group size in channels (32)
    lstm_dim: int
    horizon: int
    gamma: float
    lambda_: float
    entropy_weight: float
    value_loss_weight: float
    batch_size: int
    optimizer: OptimizerConfig
    # Row A8 of docs/official-parity.md (official src/coroutines/env_loop.py:18-25,
    # src/envs/world_model_env.py:56-89): true, the official persistent env loop: imagined rows
    # go on across updates (truncated `horizon` steps after their own start), the actor-critic's
    # LSTM state carried over detached, and the run's first start has no actor-critic burn-in;
    # false, every update restarts all rows from fresh real starts.
    continue_rows_across_updates: bool
    # Row A9 (official src/coroutines/env_loop.py:47-56): how the actor-critic's LSTM is warmed up
    # on a start's context frames. "with_gradient_unmasked": inside the update's graph, padded
    # frames fed as they are (official); "detached_masked": under no_grad, the state zeroed after
    # padded frames.
    burn_in: str


BURN_IN_MODES = ("detached_masked", "with_gradient_unmasked")


@dataclass(frozen=True)
class AgentConfig:
    """The epoch loop after the first world-model epoch (stage train-agent, docs/architecture.md §3.5)."""

    total_env_steps: int  # real-interaction budget, initial collection included
    collect_steps_per_epoch: int
    epsilon: float
    first_epoch_actor_critic_steps: int
    denoiser_steps_per_epoch: int
    reward_end_steps_per_epoch: int
    actor_critic_steps_per_epoch: int
    final_epochs_without_collection: int
    test_every_epochs: int
    test_episodes: int
    checkpoint_every_epochs: int
    model_free: bool  # the paper's ablation: actor-critic on real data only
    # Per game: the temperature of the actor's action sampling when it collects real data (logits
    # divided by it); games not listed sample at 1. The IRIS trick for Freeway (IRIS paper,
    # Appendix H; eloialonso/iris config/trainer.yaml collection.train.config.temperature), which
    # the DIAMOND authors say they also used there (eloialonso/diamond issue #34); the released
    # DIAMOND code has no such switch. Only train-agent's collection reads it: the initial
    # collection's policy is uniform (official: the untrained actor, whose zero-initialised head
    # gives logits 0, uniform at any temperature). Test episodes and the score sample at 1.
    collect_temperature: dict[str, float]

    def collect_epochs(self, initial_env_steps: int) -> int:
        """Epochs that collect after the first, until the budget is spent (the last may collect less)."""
        return -(-max(0, self.total_env_steps - initial_env_steps) // self.collect_steps_per_epoch)

    def collect_temperature_of(self, game: str) -> float:
        """The collecting policy's sampling temperature in `game` (1 unless `collect_temperature` names it)."""
        return self.collect_temperature.get(game, 1.0)


@dataclass(frozen=True)
class EvaluateConfig:
    """Final scoring and world-model fidelity (stage evaluate)."""

    episodes: int  # 100 at paper scale
    epsilon: float  # 0 at paper scale
    fidelity_episodes: int  # held-out real episodes for open-loop imagination
    fidelity_horizons: list[int]  # e.g. [15, 50]
    gif_frames: int
    # Test episodes played at once, one emulator each, the actor-critic batched over them.
    # Episode i has its own environment seed and policy stream, so the returns do not depend
    # on it (up to float rounding of the batched forward pass); speed only.
    num_envs: int


@dataclass(frozen=True)
class ReleasedConfig:
    """The authors' released agents (stages import-released and evaluate-released, diamond/official/released.py)."""

    games: list[str]  # games whose released agent is imported and evaluated; [] for none
    dir: str  # local folder searched first for {Game}.pt
    repo_id: str  # Hugging Face Hub repository of the release (official src/play.py: eloialonso/diamond)
    revision: str  # its branch, tag or commit
    filename: str  # the file in that repository; "{game}" stands for the game's name
    method_name: str  # these agents' row in the tables
    seed: int  # seed of their evaluation (test episodes, fidelity); they were trained elsewhere


@dataclass(frozen=True)
class AggregateConfig:
    """Score tables beside the published baselines (stage aggregate)."""

    method_name: str  # this project's column in the tables
    reference_methods: list[str]
    bootstrap_reps: int
    bootstrap_seed: int  # rliable resamples with numpy's global RNG; seeded for reproducible CIs
    confidence: float


@dataclass(frozen=True)
class StudyVariant:
    """One world-model variant of the study: a denoiser formulation and its number of sampling steps."""

    name: str  # in stage names, paths and tables: letters, digits, '_' and '-'
    formulation: str  # "edm" or "ddpm" (world_model.denoiser.formulation)
    num_steps: int  # denoising steps per generated frame (world_model.sampler.num_steps)


@dataclass(frozen=True)
class StudyConfig:
    """The paper's section 5.1 world-model study (stages study and study-report, diamond/world_model/study.py):
    each variant's denoiser trained on one static episode store with the same budget, then rolled
    out open loop on held-out episodes of that store."""

    # [] (no study stages) or [GAME], the game of `dataset`: DVC cannot make a stage conditional,
    # but an empty matrix/foreach generates none, so this list switches the study on and off.
    games: list[str]
    dataset: str  # path of the static episode store, e.g. runs/Breakout-0/dataset (train-agent's)
    variants: list[StudyVariant]
    seeds: list[int]
    denoiser_steps: int  # training budget of every variant and seed
    heldout_episodes: int  # the store's last finished episodes, kept out of training
    rollouts_per_episode: int  # open-loop starts per held-out episode, evenly spread
    horizons: list[int]  # steps after the last real frame reported in the table and frame strip
    bootstrap_reps: int
    bootstrap_seed: int
    confidence: float


@dataclass(frozen=True)
class Params:
    games: list[str]
    seeds: list[int]
    device: str  # "cpu", "cuda", or "auto"
    # K runs share one GPU, each capped at 1/K of its memory (scheduling only: in no stage's
    # rerun keys, stages/stage_params.py; Snakefile `res`, README "Several runs per GPU")
    runs_per_gpu: int
    channels_last: bool  # NHWC memory layout for the convolutional networks (speed only)
    compile_denoiser: bool  # torch.compile the denoiser's U-Net (speed only)
    reuse_freed_memory: bool  # keep freed CPU memory in the process (glibc malloc; speed only)
    tf32: bool  # TF32 matmuls and convolutions on CUDA for the fp32 path (official src/trainer.py); no effect on CPU
    compile_imagination: bool  # torch.compile of each imagined step, CUDA graphs for the world model's part (speed only)
    env: EnvConfig
    collect: CollectConfig
    world_model: WorldModelConfig
    actor_critic: ActorCriticConfig
    agent: AgentConfig
    evaluate: EvaluateConfig
    aggregate: AggregateConfig
    released: ReleasedConfig
    study: StudyConfig


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    yaml_names = {_yaml_name(n): n for n in fields}
    derived = {_yaml_name(n) for n, f in fields.items() if f.metadata.get("derived")}
    unknown = sorted(set(data) - set(yaml_names))
    # the full dotted path of the key, so that the message names it whatever its depth
    path = lambda key: f"{where}.{key}" if where else key  # noqa: E731
    if unknown:
        raise ConfigError(f"{path(unknown[0])}: unknown key; allowed here: {', '.join(sorted(yaml_names))}")
    missing = sorted(k for k in yaml_names if k not in data and k not in derived)
    if missing:
        raise ConfigError(f"{path(missing[0])}: missing key")
    kwargs = {}
    for key, value in data.items():
        name = yaml_names[key]
        kwargs[name] = _convert(hints[name], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _yaml_name(field_name: str) -> str:
    # `lambda` is a Python keyword, so the field is `lambda_` and the YAML key is `lambda`.
    return field_name.rstrip("_")


def _convert(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_convert(key_tp, k, f"{where} key {k!r}"): _convert(item_tp, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: union types are not supported in the config")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads `1e-4` (no dot) as a string; accept it when it parses as a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")


LIFE_COUNTERS = ("every_step", "decreases_only")
TRAINING_FRAMES = ("exact", "resaved_per_write")


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """A small string enum: a one-line error naming the key, the value and the allowed values."""
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def _validate(p: Params) -> None:
    for g in p.games:
        if g not in ATARI_100K_GAMES:
            raise ConfigError(f"games: unknown game {g!r}; allowed: {', '.join(ATARI_100K_GAMES)}")
    for g, t in p.agent.collect_temperature.items():
        if g not in ATARI_100K_GAMES:
            raise ConfigError(f"agent.collect_temperature: unknown game {g!r}; allowed: {', '.join(ATARI_100K_GAMES)}")
        if not t > 0:
            raise ConfigError(f"agent.collect_temperature.{g}: {t} must be > 0")
    for g in p.released.games:
        if g not in ATARI_100K_GAMES:
            raise ConfigError(f"released.games: unknown game {g!r}; allowed: {', '.join(ATARI_100K_GAMES)}")
    if "{game}" not in p.released.filename:
        raise ConfigError(f"released.filename: {p.released.filename!r} must contain {{game}}")
    if p.released.method_name == p.aggregate.method_name:
        raise ConfigError(f"released.method_name: {p.released.method_name!r} must differ from aggregate.method_name")
    if not p.seeds:
        raise ConfigError("seeds must list at least one entry")
    if not p.games and not p.released.games:
        raise ConfigError("games and released.games are both empty: nothing to run")
    if p.device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"device: {p.device!r} is not one of 'cpu', 'cuda', 'auto'")
    if p.world_model.denoiser.formulation not in ("edm", "ddpm"):
        raise ConfigError(
            f"world_model.denoiser.formulation: {p.world_model.denoiser.formulation!r} is not 'edm' or 'ddpm'"
        )
    den, smp = p.world_model.denoiser, p.world_model.sampler
    if den.formulation == "ddpm" and not 1 <= smp.num_steps <= den.ddpm_num_timesteps:
        raise ConfigError(
            f"world_model.sampler.num_steps: {smp.num_steps} must be in [1, {den.ddpm_num_timesteps}] "
            "(denoiser.ddpm_num_timesteps) for formulation 'ddpm'"
        )
    if p.world_model.sampler.order not in (1, 2):
        raise ConfigError(f"world_model.sampler.order: {p.world_model.sampler.order!r} is not 1 (Euler) or 2 (Heun)")
    if p.world_model.sampler.initial_noise not in ("unit", "sigma_max"):
        raise ConfigError(
            f"world_model.sampler.initial_noise: {p.world_model.sampler.initial_noise!r} is not 'unit' or 'sigma_max'"
        )
    if p.actor_critic.burn_in not in BURN_IN_MODES:
        raise ConfigError(
            f"actor_critic.burn_in: {p.actor_critic.burn_in!r} is not one of {', '.join(map(repr, BURN_IN_MODES))}"
        )
    if p.world_model.denoiser.quantization not in ("nearest", "truncate"):
        raise ConfigError(
            f"world_model.denoiser.quantization: {p.world_model.denoiser.quantization!r} is not 'nearest' or 'truncate'"
        )
    check_choice("world_model.denoiser.segment_end", p.world_model.denoiser.segment_end, SEGMENT_ENDS)
    check_choice("world_model.denoiser.segment_frames", p.world_model.denoiser.segment_frames, SEGMENT_FRAMES)
    check_choice("world_model.denoiser.padded_target_feedback", p.world_model.denoiser.padded_target_feedback,
                 PADDED_TARGET_FEEDBACKS)
    check_choice("world_model.reward_end.segment_window", p.world_model.reward_end.segment_window, SEGMENT_WINDOWS)
    check_choice("env.life_counter", p.env.life_counter, LIFE_COUNTERS)
    check_choice("world_model.training_frames", p.world_model.training_frames, TRAINING_FRAMES)
    if p.world_model.denoiser.num_autoregressive_steps < 0:
        raise ConfigError(
            f"world_model.denoiser.num_autoregressive_steps: {p.world_model.denoiser.num_autoregressive_steps} must be >= 0"
        )
    _validate_study(p.study, p.world_model.denoiser.ddpm_num_timesteps, ATARI_100K_GAMES)
    _validate_ranges(p)
    for name in p.aggregate.reference_methods:
        if name not in REFERENCE_METHODS:
            raise ConfigError(
                f"aggregate.reference_methods: unknown method {name!r}; allowed: {', '.join(REFERENCE_METHODS)}"
            )
    if p.collect.min_steps > p.collect.max_steps:
        raise ConfigError(
            f"collect.min_steps ({p.collect.min_steps}) must not exceed collect.max_steps ({p.collect.max_steps})"
        )


_POSITIVE_INT = (lambda v: v >= 1, "must be >= 1")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_POSITIVE = (lambda v: v > 0, "must be > 0")
_UNIT_INTERVAL = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
_POSITIVE_INTS = (lambda v: len(v) > 0 and all(x >= 1 for x in v), "must be a non-empty list of integers >= 1")
_NON_EMPTY = (lambda v: len(v) > 0, "must not be empty")

# Ranges of the model and optimiser keys, checked when params load so that a bad value fails
# before `collect` runs, not at the stage that first reads it (scripts/bad_input_campaign.py).
RANGE_RULES: list[tuple[str, tuple[Any, str]]] = [
    *[(f"env.{k}", _POSITIVE_INT) for k in ("frame_skip", "max_episode_frames", "obs_size")],
    ("env.max_noops", _NON_NEGATIVE),
    *[(f"collect.{k}", _POSITIVE_INT) for k in ("min_steps", "chunk_steps")],
    ("collect.min_minority_rewards", _NON_NEGATIVE),
    *[(f"world_model.{k}", _POSITIVE_INT) for k in ("batch_size", "checkpoint_every_steps", "log_every_steps")],
    *[(f"world_model.{k}", _NON_NEGATIVE) for k in ("denoiser_steps", "reward_end_steps")],
    ("world_model.denoiser.num_conditioning_frames", (lambda v: v >= 2, "must be >= 2 (a context holds a real transition)")),
    *[(f"world_model.denoiser.{k}", _POSITIVE_INT) for k in ("cond_channels", "num_groups_channels", "ddpm_num_timesteps")],
    ("world_model.denoiser.channels", _POSITIVE_INTS), ("world_model.denoiser.depths", _POSITIVE_INTS),
    ("world_model.denoiser.attention", _NON_EMPTY),
    *[(f"world_model.denoiser.{k}", _POSITIVE) for k in ("sigma_data", "train_log_sigma_scale", "train_sigma_min", "train_sigma_max")],
    ("world_model.denoiser.sigma_offset_noise", _NON_NEGATIVE),
    ("world_model.sampler.num_steps", _POSITIVE_INT),
    *[(f"world_model.sampler.{k}", _POSITIVE) for k in ("sigma_min", "sigma_max", "rho")],
    *[(f"world_model.sampler.{k}", _NON_NEGATIVE) for k in ("s_churn", "s_tmin", "s_tmax", "s_noise")],
    ("world_model.reward_end.channels", _POSITIVE_INTS), ("world_model.reward_end.depths", _POSITIVE_INTS),
    *[(f"world_model.reward_end.{k}", _POSITIVE_INT) for k in ("cond_channels", "num_groups_channels", "lstm_dim")],
    ("actor_critic.channels", _POSITIVE_INTS),
    *[(f"actor_critic.{k}", _POSITIVE_INT) for k in ("num_groups_channels", "lstm_dim", "horizon", "batch_size")],
    ("actor_critic.gamma", _UNIT_INTERVAL), ("actor_critic.lambda", _UNIT_INTERVAL),
    ("actor_critic.entropy_weight", _NON_NEGATIVE), ("actor_critic.value_loss_weight", _NON_NEGATIVE),
    *[(f"{opt}.{k}", rule) for opt in ("world_model.denoiser_optimizer", "world_model.reward_end_optimizer", "actor_critic.optimizer")
      for k, rule in (("lr", _POSITIVE), ("eps", _POSITIVE), ("weight_decay", _NON_NEGATIVE),
                      ("warmup_steps", _NON_NEGATIVE), ("max_grad_norm", _POSITIVE))],
    *[(f"agent.{k}", _POSITIVE_INT) for k in ("total_env_steps", "collect_steps_per_epoch", "test_every_epochs",
                                               "test_episodes", "checkpoint_every_epochs")],
    *[(f"agent.{k}", _NON_NEGATIVE) for k in ("first_epoch_actor_critic_steps", "denoiser_steps_per_epoch",
                                               "reward_end_steps_per_epoch", "actor_critic_steps_per_epoch",
                                               "final_epochs_without_collection")],
    ("agent.epsilon", _UNIT_INTERVAL),
    *[(f"evaluate.{k}", _POSITIVE_INT) for k in ("episodes", "fidelity_episodes", "gif_frames", "num_envs")],
    ("evaluate.epsilon", _UNIT_INTERVAL), ("evaluate.fidelity_horizons", _POSITIVE_INTS),
    ("aggregate.bootstrap_reps", (lambda v: v >= 2, "is too few; use at least 2 (2000 in the paper's protocol)")),
    ("aggregate.confidence", (lambda v: 0 < v < 1, "must lie strictly between 0 and 1 (e.g. 0.95)")),
    ("runs_per_gpu", _POSITIVE_INT),
    # seeds of numpy/torch generators are non-negative
    ("seeds", (lambda v: all(x >= 0 for x in v), "must be integers >= 0")),
    *[(k, _NON_NEGATIVE) for k in ("aggregate.bootstrap_seed", "released.seed", "study.bootstrap_seed")],
]


def _check_rules(data: dict, prefix: str) -> None:
    """Apply the RANGE_RULES under `prefix` ("" for all) to `data`, the YAML data at `prefix`."""
    for key, (ok, allowed) in RANGE_RULES:
        if prefix and not key.startswith(prefix + "."):
            continue
        value: Any = data
        for part in key.removeprefix(prefix + "." if prefix else "").split("."):
            value = value[part]
        if not ok(value):
            raise ConfigError(f"{key}: {value!r} {allowed}")


def check_section(section: Any, prefix: str) -> None:
    """The RANGE_RULES of one section (e.g. an EnvConfig built by hand, prefix "env")."""
    _check_rules(to_dict(section), prefix)


def _validate_ranges(p: Params) -> None:
    _check_rules(to_dict(p), "")
    den = p.world_model.denoiser
    if not len(den.channels) == len(den.depths) == len(den.attention):
        raise ConfigError(f"world_model.denoiser: channels {den.channels}, depths {den.depths} and attention "
                          f"{den.attention} must have one entry per level")
    for where, lo, hi in (("world_model.denoiser.train_sigma", den.train_sigma_min, den.train_sigma_max),
                          ("world_model.sampler.sigma", p.world_model.sampler.sigma_min, p.world_model.sampler.sigma_max)):
        if lo > hi:
            raise ConfigError(f"{where}_min ({lo}) must not exceed {where}_max ({hi})")


STUDY_FORMULATIONS = ("edm", "ddpm")
# Segment placement switches (diamond/data/sampler.py Placement; docs/official-parity.md C3, C7, C8).
SEGMENT_ENDS = ("uniform", "clipped")
SEGMENT_FRAMES = ("with_final", "without_final")
SEGMENT_WINDOWS = ("ends_at_step", "both_sides")
# What a padding target feeds the next target's context (Denoiser.loss; docs/official-parity.md D2).
PADDED_TARGET_FEEDBACKS = ("zeroed", "estimate")
VARIANT_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def validate_variant(v: StudyVariant, ddpm_num_timesteps: int, where: str) -> None:
    """One study variant (also checked by the study stage, which takes it on its command line)."""
    if not v.name or not v.name[0].isalpha() or not set(v.name) <= VARIANT_NAME_CHARS:
        raise ConfigError(f"{where}.name: {v.name!r} must start with a letter and hold only letters, digits, '_' and '-'")
    if v.formulation not in STUDY_FORMULATIONS:
        raise ConfigError(f"{where}.formulation: {v.formulation!r} is not one of {', '.join(map(repr, STUDY_FORMULATIONS))}")
    top = ddpm_num_timesteps if v.formulation == "ddpm" else None
    if v.num_steps < 1 or (top is not None and v.num_steps > top):
        allowed = f"[1, {top}] (world_model.denoiser.ddpm_num_timesteps)" if top is not None else ">= 1"
        raise ConfigError(f"{where}.num_steps: {v.num_steps} must be {allowed}")


def _validate_study(s: StudyConfig, ddpm_num_timesteps: int, games: tuple[str, ...] | list[str]) -> None:
    if len(s.games) > 1:
        raise ConfigError(f"study.games: {s.games} holds more than one game; study.dataset is one game's episode store")
    for g in s.games:
        if g not in games:
            raise ConfigError(f"study.games: unknown game {g!r}; allowed: {', '.join(games)}")
    for i, v in enumerate(s.variants):
        validate_variant(v, ddpm_num_timesteps, f"study.variants[{i}]")
    names = [v.name for v in s.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"study.variants: names {names} must be unique")
    if s.games and not (s.variants and s.seeds):
        raise ConfigError("study.variants and study.seeds must both be non-empty when study.games names a game")
    for key in ("denoiser_steps", "heldout_episodes", "rollouts_per_episode", "bootstrap_reps"):
        if getattr(s, key) < 1:
            raise ConfigError(f"study.{key}: {getattr(s, key)} must be >= 1")
    if not s.horizons or min(s.horizons) < 1 or sorted(set(s.horizons)) != s.horizons:
        raise ConfigError(f"study.horizons: {s.horizons} must be a non-empty increasing list of integers >= 1")
    if not 0 < s.confidence < 1:
        raise ConfigError(f"study.confidence: {s.confidence} must be in (0, 1)")


# Switches that select the official code's behaviour where this project keeps its own by default:
# dotted params key -> (the value that reproduces github.com/eloialonso/diamond, its row in
# docs/official-parity.md). Table 1 came from that code, quirks included, so configs/paper.yaml and
# configs/released.yaml set every one to the official value; the small configs keep ours
# (tests/test_config.py).
OFFICIAL_BEHAVIOUR: dict[str, tuple[Any, str]] = {
    "world_model.denoiser.segment_end": ("clipped", "C7"),
    "world_model.denoiser.segment_frames": ("without_final", "C8"),
    "world_model.denoiser.padded_target_feedback": ("estimate", "D2"),
    "world_model.reward_end.segment_window": ("both_sides", "C3"),
    "env.life_counter": ("decreases_only", "P8"),
    "world_model.training_frames": ("resaved_per_write", "C9"),
    "actor_critic.continue_rows_across_updates": (True, "A8"),
    "actor_critic.burn_in": ("with_gradient_unmasked", "A9"),
    **{f"{opt}.warmup_starts_at_zero": (True, "O3")
       for opt in ("world_model.denoiser_optimizer", "world_model.reward_end_optimizer", "actor_critic.optimizer")},
}


# Derived fields: (dotted key, what it is derived from). A params file may not set them.
DERIVED: dict[str, str] = {
    "world_model.reward_end.segment_length": "actor_critic.horizon + world_model.denoiser.num_conditioning_frames",
}


def _with_derived(p: Params) -> Params:
    wm = p.world_model
    reward_end = dataclasses.replace(
        wm.reward_end, segment_length=p.actor_critic.horizon + wm.denoiser.num_conditioning_frames
    )
    return dataclasses.replace(p, world_model=dataclasses.replace(wm, reward_end=reward_end))


def params_from_dict(data: Any) -> Params:
    for key, source in DERIVED.items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"{key}: derived ({source}), not a params key; remove it")
    params = _with_derived(_build(Params, data, ""))
    _validate(params)
    return params


def load_params(path: str | Path) -> Params:
    """Read and check a params file; raise ConfigError with a one-line message on any problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return params_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(obj: Any) -> dict:
    """The params as plain data with YAML key names (for logging and hashing)."""
    d = dataclasses.asdict(obj)
    return _rename(d)


def _rename(d: Any) -> Any:
    if isinstance(d, dict):
        return {_yaml_name(k): _rename(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_rename(v) for v in d]
    return d


def params_hash(obj: Any) -> str:
    """A stable hash of a config section, for tagging runs with exactly what they read."""
    return hashlib.sha256(json.dumps(to_dict(obj), sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`, for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
