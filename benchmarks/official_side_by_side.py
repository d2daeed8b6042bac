"""Side by side with the official DIAMOND code, same process, same machine (issue 20, point 4).

    python -m benchmarks.official_side_by_side --official PATH [--device cpu|cuda] [--repeats N]
        [--parts actor_critic_train_step ...] [--ours-compile both] [--set key=value ...]

--parts picks the figures (all three by default); --ours-compile both times our actor-critic step
eager and with compile_imagination in the same process (issue 28: benchmarks/gpu_check.sh);
without --official only ours are timed (the CPU dry run of gpu_check.sh).

PATH is a checkout of the authors' code (github.com/eloialonso/diamond, branch main), fetched by
the user; nothing of it is stored here. Its `src/` goes on sys.path and its own modules are timed,
built from its own configs (`config/agent/default.yaml`, `config/env/atari.yaml`,
`config/trainer.yaml`), beside ours built from `--params` (default configs/paper.yaml):

(a) the denoiser's training step: loss on a batch of 32 segments (4 conditioning frames, the
    configured autoregressive targets), backward, gradient clipping, AdamW (official
    src/trainer.py `train_component`, with its `configure_opt` and warm-up schedule);
(b) next-frame sampling, batch 32 (3 Euler steps): official `WorldModelEnv.predict_next_obs`
    (torch.compile(mode="reduce-overhead") when its `training.compile_wm`, as its trainer does),
    ours `world_model.sampler` as train-agent imagines (compile_denoiser, compile_imagination);
(c) the actor-critic's training step: 15 imagined steps, loss, backward, AdamW (official
    `ActorCritic.forward` over its `WorldModelEnv`; ours `diamond.agent.policy.imagination_loss`).

Inputs are random: uint8 frames (64x64) and actions, the same tensors for both. The official
WorldModelEnv draws its starts from a data loader; a stand-in (`RandomStarts`) yields the official
`Batch` of 4-frame segments from a pool of random frames. It preloads one batch at a time
(`num_batches_to_preload: 1` instead of 256), so that each step pays for the R burn-ins of the
rows it restarts, as ours does; the per-row work is the same. Both reward/termination models are
at their random init with the termination logit biased to "no" (benchmarks.bench.rarely_terminating;
the official R gets the same bias on a copy of its last layer), so rows end at the horizon, as a
trained R has them do on most frames. Both actor-critics are at their (official) init.

Same process, same threads, same allocator (`reuse_freed_memory` of the params, set before
anything is built), same TF32 flag (the params' `tf32`; the official trainer turns TF32 matmuls
on, as paper.yaml does). Each figure is the best of --repeats timed calls after one warm-up call
(which also compiles). Packages the official modules import but the timed paths never use, when
missing here (wandb, torcheval, ...), are replaced by empty stub modules; the output names them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import json
import math
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from benchmarks.bench import (
    BENCH_NUM_ACTIONS,
    BenchSegment,
    NO_END_LOGIT,
    best_time,
    cpu_name,
    make_actor_critic_step,
    make_train_step,
    rarely_terminating,
    synthetic_store,
)
from diamond.allocator import reuse_freed_memory
from diamond.config import load_params
from diamond.data import SegmentSampler
from diamond.models.reward_end import RewardEndModel
from diamond.training import compile_networks, set_memory_format, set_tf32
from diamond.world_model.denoiser import Denoiser
from diamond.world_model.model import make_sampler

ROOT = Path(__file__).resolve().parents[1]
# Packages the official src/ imports at module level whose functions the timed paths never call
# (logging, metrics, the emulator behind envs/env.py, the hydra entry point).
STUBBABLE = ("wandb", "torcheval", "cv2", "ale_py", "gymnasium", "hydra", "omegaconf", "tqdm")


# ---------------------------------------------------------------- the official code's imports


class _StubType(type):
    """A class whose every attribute is another such class (base classes, type aliases, ...)."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubType(name, (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubType(name, (), {"__module__": self.__name__})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for the packages in `roots` and all their submodules."""

    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        if fullname.split(".")[0] not in self.roots:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):  # noqa: ANN001
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:  # noqa: ANN001
        pass


def import_official(checkout: Path) -> tuple[dict[str, Any], list[str]]:
    """The official modules the benchmark uses, from checkout/src; and the stubbed packages."""
    src = checkout / "src"
    if not (src / "envs" / "world_model_env.py").is_file():
        raise SystemExit(f"--official: {checkout} is not a checkout of eloialonso/diamond (no src/envs/world_model_env.py)")
    missing = []
    for root in STUBBABLE:
        try:
            importlib.import_module(root)
        except ImportError:
            missing.append(root)
    if missing:
        sys.meta_path.insert(0, _StubFinder(set(missing)))
    sys.path.insert(0, str(src))
    names = {
        "agent": ["Agent", "AgentConfig"],
        "models.diffusion": ["DenoiserConfig", "InnerModelConfig", "SigmaDistributionConfig", "DiffusionSamplerConfig"],
        "models.rew_end_model": ["RewEndModelConfig"],
        "models.actor_critic": ["ActorCriticConfig", "ActorCriticLossConfig"],
        "envs": ["WorldModelEnv", "WorldModelEnvConfig"],
        "data": ["Batch"],
        "utils": ["configure_opt", "get_lr_sched"],
    }
    found = {}
    for module, attrs in names.items():
        m = importlib.import_module(module)
        found.update({a: getattr(m, a) for a in attrs})
    return found, missing


# ---------------------------------------------------------------- the official configs


def _lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def resolve(tree: dict, value: Any) -> Any:
    """A config value with its `${a.b}` references and `${eval:'...'}` expressions resolved (the
    two interpolations the official configs use on the keys read here), without omegaconf."""
    if isinstance(value, dict):
        return {k: resolve(tree, v) for k, v in value.items() if k != "_target_"}
    if isinstance(value, list):
        return [resolve(tree, v) for v in value]
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value):
        return float(value)  # YAML 1.1 (PyYAML) reads 1e-4 as a string; omegaconf as a float
    if not isinstance(value, str) or "${" not in value:
        return value
    ref = re.fullmatch(r"\$\{([A-Za-z_][\w.]*)\}", value)
    if ref:
        return resolve(tree, _lookup(tree, ref.group(1)))
    expr = re.fullmatch(r"\$\{eval:'(.*)'\}", value)
    if expr:
        inner = re.sub(r"\$\{([A-Za-z_][\w.]*)\}", lambda m: repr(resolve(tree, _lookup(tree, m.group(1)))), expr.group(1))
        return eval(inner, {"__builtins__": {}, "float": float, "int": int})  # noqa: S307 - the checkout's own config
    raise SystemExit(f"official config: cannot resolve {value!r}")


def official_config(checkout: Path) -> dict:
    cfg_dir = checkout / "config"
    tree = yaml.safe_load((cfg_dir / "trainer.yaml").read_text())
    tree["agent"] = yaml.safe_load((cfg_dir / "agent" / "default.yaml").read_text())
    tree["env"] = yaml.safe_load((cfg_dir / "env" / "atari.yaml").read_text())
    return tree


# ---------------------------------------------------------------- inputs


class RandomStarts:
    """The official WorldModelEnv's data loader: endless official `Batch`es of `seq_len` frames
    drawn from a pool of random uint8 frames (WorldModelEnv reads `.batch_sampler.batch_size`,
    iterates, and uses `.obs` and `.act`)."""

    def __init__(self, batch_cls: type, frames: torch.Tensor, batch_size: int, seq_len: int, num_actions: int, seed: int) -> None:
        self.batch_cls, self.frames, self.seq_len, self.num_actions = batch_cls, frames, seq_len, num_actions
        self.batch_sampler = types.SimpleNamespace(batch_size=batch_size)
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        b, t = self.batch_sampler.batch_size, self.seq_len
        while True:
            idx = torch.randint(0, self.frames.shape[0], (b, t), generator=self.gen)
            obs = self.frames[idx].float().div(255).mul(2).sub(1)  # official src/data/episode.py
            act = torch.randint(0, self.num_actions, (b, t), generator=self.gen)
            z = torch.zeros(b, t)
            yield self.batch_cls(obs, act, z, z.long(), z.long(), torch.ones(b, t, dtype=torch.bool),
                                 [{}] * b, [None] * b)


def random_segment(frames: torch.Tensor, batch: int, num_frames: int, num_actions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(obs float (B, T, 3, H, W) in [-1, 1], act long (B, T)) from the random frame pool."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, frames.shape[0], (batch, num_frames), generator=gen)
    obs = frames[idx].float().div(255).mul(2).sub(1)
    return obs, torch.randint(0, num_actions, (batch, num_frames), generator=gen)


# ---------------------------------------------------------------- official steps


def official_optimiser_step(o: dict, model: torch.nn.Module, opt_cfg: dict, training: dict, loss_fn):
    """One step of official src/trainer.py `train_component` (grad_acc_steps 1): loss, backward,
    clip_grad_norm_, AdamW step, zero_grad, scheduler step."""
    opt = o["configure_opt"](model, **opt_cfg)
    sched = o["get_lr_sched"](opt, training["lr_warmup_steps"])

    def step() -> float:
        loss, _ = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), training["max_grad_norm"])
        opt.step()
        opt.zero_grad()
        sched.step()
        return float(loss.detach())

    return step


def bias_official_termination(o_agent: Any) -> None:
    """The official R's last layer (no bias) as a copy with a bias that favours "no termination"."""
    head = o_agent.rew_end_model.head
    last = head[-1]
    biased = torch.nn.Linear(last.in_features, last.out_features, bias=True).to(last.weight.device)
    with torch.no_grad():
        biased.weight.copy_(last.weight)
        biased.bias.zero_()
        biased.bias[-2:] = torch.tensor([NO_END_LOGIT, -NO_END_LOGIT])
    head[-1] = biased


def build_official(o: dict, tree: dict, device: torch.device, num_actions: int) -> Any:
    a = resolve(tree, tree["agent"])
    den = a["denoiser"]
    cfg = o["AgentConfig"](
        denoiser=o["DenoiserConfig"](inner_model=o["InnerModelConfig"](**den["inner_model"]),
                                     sigma_data=den["sigma_data"], sigma_offset_noise=den["sigma_offset_noise"]),
        rew_end_model=o["RewEndModelConfig"](**a["rew_end_model"]),
        actor_critic=o["ActorCriticConfig"](**a["actor_critic"]),
        num_actions=num_actions,
    )
    torch.manual_seed(0)
    return o["Agent"](cfg).to(device)


# ---------------------------------------------------------------- the benchmark


PARTS = ("denoiser_train_step", "sample", "actor_critic_train_step")


def ours_actor_critic_steps(p, den: Denoiser, device: torch.device, b: int, ours_compile: str):
    """Our actor-critic training step, as train-agent takes it, eager and/or with
    compile_imagination (`ours_compile`: "params" as the params say, "eager", "compiled", "both")."""
    import tempfile

    modes = {"params": [p.compile_imagination], "eager": [False], "compiled": [True], "both": [False, True]}[ours_compile]
    with tempfile.TemporaryDirectory() as tmp:
        segments = SegmentSampler(synthetic_store(Path(tmp) / "store", p.env.obs_size), np.random.default_rng(0))
        torch.manual_seed(0)
        reward_end = RewardEndModel(p.world_model.reward_end, BENCH_NUM_ACTIONS, p.env.obs_size, output_bias=True).to(device)
        set_memory_format(p.channels_last, reward_end)
        rarely_terminating(reward_end)
        for compiled in modes:
            bench_args = argparse.Namespace(obs_size=p.env.obs_size, batch_size=b, channels_last=p.channels_last,
                                            compile_imagination=compiled)
            yield compiled, make_actor_critic_step(p, den, reward_end, segments, bench_args, device, bf16=False)


def use_compile_backend(backend: str) -> None:
    """Every torch.compile of this process (ours and the official code's) with `backend` instead of
    inductor, its `mode` dropped (modes are inductor's). For a dry run: "aot_eager" runs dynamo's
    capture (fullgraph included) and AOTAutograd without inductor's minute of code generation."""
    if backend == "inductor":
        return
    compile_fn = torch.compile

    def compile_with(model=None, **kwargs):
        kwargs.pop("mode", None)
        return compile_fn(model, backend=backend, **kwargs)

    torch.compile = compile_with  # type: ignore[assignment]


def run(args: argparse.Namespace) -> dict:
    from benchmarks.packed_throughput import load_params_with

    use_compile_backend(args.compile_backend)
    p = load_params_with(args.params, args.set)
    device = torch.device(args.device)
    allocator = reuse_freed_memory(p.reuse_freed_memory)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_tf32(p.tf32)
    o, stubbed = import_official(args.official) if args.official else ({}, [])
    tree = official_config(args.official) if args.official else {}
    compile_wm = bool(tree and tree["training"]["compile_wm"]) and not args.official_eager
    b, size = args.batch_size, p.env.obs_size
    L = p.world_model.denoiser.num_conditioning_frames
    k = p.world_model.denoiser.num_autoregressive_steps
    if tree:
        o_k = int(tree["denoiser"]["training"]["num_autoregressive_steps"])
        o_L = int(tree["agent"]["denoiser"]["inner_model"]["num_steps_conditioning"])
        o_horizon = int(tree["world_model_env"]["horizon"])
        if (L, k, p.actor_critic.horizon) != (o_L, o_k, o_horizon):
            print(f"note: ours L={L}, autoregressive={k}, horizon={p.actor_critic.horizon}; "
                  f"official {o_L}, {o_k}, {o_horizon}")
    frames = torch.randint(0, 256, (1024, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "params": str(args.params),
        "overrides": args.set, "official": str(args.official) if args.official else None, "parts": args.parts,
        "compile_backend": args.compile_backend,
        "batch_size": b, "obs_size": size, "repeats": args.repeats,
        "reuse_freed_memory": allocator, "tf32": p.tf32, "official_compile_wm": compile_wm,
        "ours_channels_last": p.channels_last, "ours_compile_denoiser": p.compile_denoiser,
        "ours_compile_imagination": p.compile_imagination, "stubbed_modules": stubbed,
    }
    if stubbed:
        print(f"stubbed (imported by the official code, unused by the timed paths): {', '.join(stubbed)}")
    def time(fn, key: str) -> float:
        result[key] = best_time(fn, device, args.repeats)
        print(f"{key}: {result[key]:.4g}", flush=True)  # as it goes: a paper-config CPU run takes long
        if args.json:  # also as it goes: a timeout keeps the figures already taken
            from diamond.io import atomic_write_json

            atomic_write_json(args.json, result)
        return result[key]

    # (a) the denoiser's training step, on the same frames and actions
    obs, act = random_segment(frames, b, L + 1 + k, BENCH_NUM_ACTIONS, seed=1)
    obs, act = obs.to(device), act.to(device)
    z = torch.zeros(b, L + 1 + k, device=device)
    if tree:
        agent = build_official(o, tree, device, BENCH_NUM_ACTIONS)
        agent.denoiser.setup_training(o["SigmaDistributionConfig"](**resolve(tree, tree["denoiser"]["sigma_distribution"])))
        batch = o["Batch"](obs, act, z, z.long(), z.long(), torch.ones_like(z, dtype=torch.bool), [{}] * b, [None] * b)
        agent.train()
        if "denoiser_train_step" in args.parts:
            o_step = official_optimiser_step(o, agent.denoiser, resolve(tree, tree["denoiser"]["optimizer"]),
                                             resolve(tree, tree["denoiser"]["training"]), lambda: agent.denoiser(batch))
            time(o_step, "official_denoiser_train_step_s")
            del o_step
    torch.manual_seed(0)
    den = Denoiser(p.world_model.denoiser, BENCH_NUM_ACTIONS).to(device)
    set_memory_format(p.channels_last, den)
    compile_networks(p.compile_denoiser, den.net)
    seg = BenchSegment(obs=obs, act=act[:, : L + k], rew=z[:, : L + k], terminated=z[:, : L + k].bool(),
                       truncated=z[:, : L + k].bool(), mask=torch.ones_like(z, dtype=torch.bool))
    den.train()
    if "denoiser_train_step" in args.parts:
        time(make_train_step(den, p.world_model, seg, device, bf16=False), "ours_denoiser_train_step_s")

    # (b) next-frame sampling from the same 4 frames and actions
    prev_obs, prev_act = (x[:, :L].contiguous() for x in (obs, act))
    if tree:
        loader = RandomStarts(o["Batch"], frames, b, o_L, BENCH_NUM_ACTIONS, seed=2)
        smp = resolve(tree, tree["world_model_env"])
        wm_env = o["WorldModelEnv"](agent.denoiser, agent.rew_end_model, loader, o["WorldModelEnvConfig"](
            horizon=smp["horizon"], num_batches_to_preload=1,
            diffusion_sampler=o["DiffusionSamplerConfig"](**smp["diffusion_sampler"])))
        if compile_wm:  # official src/trainer.py, training.compile_wm
            wm_env.predict_next_obs = torch.compile(wm_env.predict_next_obs, mode="reduce-overhead")
            wm_env.predict_rew_end = torch.compile(wm_env.predict_rew_end, mode="reduce-overhead")

        def o_sample() -> None:
            wm_env.obs_buffer, wm_env.act_buffer = prev_obs, prev_act
            wm_env.predict_next_obs()

        if "sample" in args.parts:
            time(o_sample, "official_sample_s")
    den.eval()
    if "sample" in args.parts:
        sampler = make_sampler(den, p.world_model)
        time(lambda: sampler.sample(prev_obs, prev_act), "ours_sample_s")

    # (c) the actor-critic's training step in imagination
    if "actor_critic_train_step" in args.parts:
        if tree:
            bias_official_termination(agent)
            ac_train = resolve(tree, tree["actor_critic"])
            agent.actor_critic.setup_training(wm_env, o["ActorCriticLossConfig"](**ac_train["actor_critic_loss"]))
            o_ac = official_optimiser_step(o, agent.actor_critic, ac_train["optimizer"], ac_train["training"], agent.actor_critic)
            time(o_ac, "official_actor_critic_train_step_s")
            del agent, wm_env, o_ac
        for compiled, ours_ac in ours_actor_critic_steps(p, den, device, b, args.ours_compile):
            key = "ours_actor_critic_train_step_s_" + ("compiled" if compiled else "eager")
            t = time(ours_ac, key)
            if compiled == p.compile_imagination:
                result["ours_actor_critic_train_step_s"] = t  # as train-agent runs it with these params
        if "ours_actor_critic_train_step_s_compiled" in result and "ours_actor_critic_train_step_s_eager" in result:
            result["ours_compile_imagination_speedup"] = (
                result["ours_actor_critic_train_step_s_eager"] / result["ours_actor_critic_train_step_s_compiled"])
    for part in args.parts:
        if f"official_{part}_s" in result and f"ours_{part}_s" in result:
            result[f"ratio_official_over_ours_{part}"] = result[f"official_{part}_s"] / result[f"ours_{part}_s"]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path,
                    help="a checkout of github.com/eloialonso/diamond (without: ours only, e.g. for a dry run)")
    ap.add_argument("--params", type=Path, default=ROOT / "configs" / "paper.yaml", help="our params file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of --params")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which figures to take")
    ap.add_argument("--ours-compile", choices=("params", "eager", "compiled", "both"), default="params",
                    help="our actor-critic step as the params' compile_imagination says, eager, compiled, or both")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per figure after a warm-up; the best is kept")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (default: torch's own)")
    ap.add_argument("--official-eager", action="store_true",
                    help="do not compile the official imagination even when its training.compile_wm is on")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of every compilation (a dry run: aot_eager, no code generation)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1:
        ap.error(f"--repeats {args.repeats} and --batch-size {args.batch_size} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        from diamond.io import atomic_write_json

        atomic_write_json(args.json, result)
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) and math.isfinite(value) else f"{key}: {value}")
    ratios = [f"{part} {result[f'ratio_official_over_ours_{part}']:.2f}x" for part in args.parts
              if f"ratio_official_over_ours_{part}" in result]
    if ratios:
        print("ratio official/ours (> 1: ours faster): " + ", ".join(ratios))


if __name__ == "__main__":
    sys.exit(main())
