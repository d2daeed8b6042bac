"""The imagined step and the world model's training losses as single graphs (issue 28, part 1).

torch.compile(fullgraph=True) turns any graph break (a `.item()`, a data-dependent branch, a
tensor read on the host, an unsupported module) into an error, so these CPU tests show a
regression that on a GPU would split the CUDA graph of `compile_imagination` and add host round
trips. The backend is "aot_eager": dynamo's capture and AOTAutograd's forward and backward
graphs, run by eager kernels, so the check takes seconds and needs no C++ compiler; inductor's
own code is covered by tests/test_imagination.py::test_compiled_imagination_gives_eager_results.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_params_dict
from diamond.agent.imagination import ImaginationEnv, categorical
from diamond.config import Params, params_from_dict
from diamond.data import SegmentSampler
from diamond.models.actor_critic import ActorCritic
from diamond.models.reward_end import RewardEndModel
from diamond.world_model.denoiser import Denoiser
from diamond.world_model.sampler import DiffusionSampler

NUM_ACTIONS, SIZE, BATCH = 18, 32, 3  # 18: benchmarks.bench's synthetic store


@pytest.fixture(scope="module")
def params() -> Params:
    """conftest's tiny params with a 4-level U-Net (middle attention at 4x4) and churn on, so the
    sampler's churn noise and its extra denoiser calls are in the graph too."""
    d = tiny_params_dict()
    d["world_model"]["denoiser"].update(channels=[16] * 4, depths=[1] * 4, attention=[False, False, False, True])
    d["world_model"]["sampler"].update(num_steps=3, s_churn=1.0, s_tmin=0.0, s_tmax=float("inf"))
    return params_from_dict(d)


def models(p: Params) -> tuple[Denoiser, RewardEndModel, ActorCritic]:
    torch.manual_seed(0)
    wm = p.world_model
    den = Denoiser(wm.denoiser, NUM_ACTIONS)
    reward_end = RewardEndModel(wm.reward_end, NUM_ACTIONS, SIZE, output_bias=True)
    ac = ActorCritic(p.actor_critic, NUM_ACTIONS, SIZE)
    with torch.no_grad():
        ac.actor.weight.normal_(0, 0.1)  # zero-initialised heads would hide a wrong input
        ac.critic.weight.normal_(0, 0.1)
    return den.eval(), reward_end.eval(), ac


def env_of(p: Params, den: Denoiser, reward_end: RewardEndModel, tmp: Path | None = None) -> ImaginationEnv:
    """An eager ImaginationEnv; with `tmp`, drawing its starts from benchmarks.bench's synthetic store."""
    segments = None
    if tmp is not None:
        from benchmarks.bench import synthetic_store

        segments = SegmentSampler(synthetic_store(tmp / "store", SIZE), np.random.default_rng(0))
    sampler = DiffusionSampler(den, p.world_model.sampler, quantization=p.world_model.denoiser.quantization)
    return ImaginationEnv(sampler, reward_end, segments, p.world_model.denoiser.num_conditioning_frames,  # type: ignore[arg-type]
                          BATCH, p.actor_critic.horizon, torch.device("cpu"))


# Reads of a tensor's value into Python. torch 2.13's dynamo may keep a `.item()` in the graph
# (as an unbacked scalar) instead of breaking it; on a GPU that is still a host sync.
HOST_READ_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__")


def host_reads(graph: torch.fx.GraphModule) -> list[str]:
    """The nodes of a dynamo graph that read a tensor's value into Python."""
    return [str(n.target) for n in graph.graph.nodes
            if (n.op == "call_method" and n.target in HOST_READ_METHODS)
            or (n.op == "call_function" and "_local_scalar_dense" in str(n.target))]


def fullgraph(fn: Callable) -> Callable:
    """`fn` under torch.compile(fullgraph=True), with dynamo's allow_rnn (as compile_imagination
    sets it for R's LSTM) while it traces; each call also checks that dynamo's one graph reads
    no tensor value into Python."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(graph)
        return aot_eager(graph, example_inputs)

    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)

    def call(*args):
        with torch._dynamo.config.patch(allow_rnn=True):
            out = compiled(*args)
        assert len(graphs) == 1, f"{len(graphs)} graphs"
        assert not host_reads(graphs[0]), f"host reads in the graph: {host_reads(graphs[0])}"
        return out

    return call


def step_inputs(p: Params, env: ImaginationEnv, ac: ActorCritic) -> tuple:
    """What one imagined step reads: the frame to act on, the actor-critic's state, the last L
    frames and actions (the one played last), the sampler's noise and R's warmed-up state."""
    L = p.world_model.denoiser.num_conditioning_frames
    gen = torch.Generator().manual_seed(1)
    obs_buffer = torch.rand(BATCH, L, 3, SIZE, SIZE, generator=gen) * 2 - 1
    act_buffer = torch.randint(0, NUM_ACTIONS, (BATCH, L), generator=gen)
    with torch.no_grad():
        ac_state = ac.burn_in(obs_buffer[:, :-1])
        reward_state = env._warm(obs_buffer, act_buffer[:, :-1])
    noise = env.sampler.draw_noise(obs_buffer, gen)
    assert len(noise) == 1 + p.world_model.sampler.num_steps  # churn at every step: its draws are inputs
    return obs_buffer[:, -1], ac_state, obs_buffer, act_buffer, noise, reward_state


def imagined_step(ac: ActorCritic, env: ImaginationEnv) -> Callable:
    """One imagined step's networks, as imagination_loss and ImaginationEnv.step call them: the
    actor-critic's forward on the frame, the sampler's denoiser calls and R on the transition
    (`_transition`), and the actor-critic's value of the new frame. Random draws are inputs."""

    def step(obs, ac_state, obs_buffer, act_buffer, noise, reward_state):
        logits, value, ac_state = ac(obs, ac_state)
        next_obs, logits_rew, logits_end, reward_state = env._transition(obs_buffer, act_buffer, noise, reward_state)
        with torch.no_grad():
            _, next_value, _ = ac(next_obs, ac_state)
        return logits, value, next_obs, logits_rew, logits_end, reward_state, next_value, ac_state

    return step


def flat(xs) -> list[torch.Tensor]:
    return [t for x in xs for t in (flat(x) if isinstance(x, (tuple, list)) else [x])]


def test_one_imagined_step_is_one_graph_with_eager_outputs(params: Params) -> None:
    """Actor-critic forward, the sampler's 3 denoiser calls with churn, R and the next value: one
    graph, no break; same outputs as eager (to float rounding: AOTAutograd decomposes R's LSTM),
    and the same gradient into the actor-critic."""
    den, reward_end, ac = models(params)
    env = env_of(params, den, reward_end)
    inputs = step_inputs(params, env, ac)
    step = imagined_step(ac, env)
    eager = step(*inputs)
    compiled = fullgraph(step)(*inputs)
    for a, b in zip(flat(compiled), flat(eager), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    grads = []
    for out in (eager, compiled):
        ac.zero_grad(set_to_none=True)
        (out[0].logsumexp(-1).sum() + out[1].sum()).backward()
        grads.append([q.grad.clone() for q in ac.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("read", ["value", "branch"])
def test_a_host_read_in_the_step_fails_the_check(params: Params, monkeypatch: pytest.MonkeyPatch, read: str) -> None:
    """The check above can fail: one `.item()` in the denoiser's call, its value used in the
    computation (dynamo keeps it in the graph) or in a Python branch (a graph break)."""
    den, reward_end, ac = models(params)
    env = env_of(params, den, reward_end)
    inputs = step_inputs(params, env, ac)
    denoise = Denoiser.denoise

    def reading(self, x, sigma, prev_obs, prev_act):
        out = denoise(self, x, sigma, prev_obs, prev_act)
        if read == "value":
            return out * out.abs().max().item()
        return out if out.abs().max().item() < 1e9 else -out

    monkeypatch.setattr(Denoiser, "denoise", reading)
    torch._dynamo.reset()
    with pytest.raises((AssertionError, torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):
        fullgraph(imagined_step(ac, env))(*inputs)


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (`.item()`, `bool()`, `int()`, `float()`:
    aten._local_scalar_dense), each a host sync when the tensor is on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_host_reads() -> Iterator[HostReads]:
    with HostReads() as reads:
        yield reads


def test_an_eager_imagined_step_reads_the_host_once(params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole imagined step as imagination_loss takes it (policy sample, log-prob, entropy,
    ImaginationEnv.step with its reward and termination draws and restarts, next value, restart
    burn-in) reads one value on the host: the count of ended rows. Validated Categoricals read
    two more per distribution (their `if not valid.all()`), which the test would count."""
    # PyTorch's default, which the first torch.compile of a process turns off for good (so eager
    # runs before any compilation, as the stages' without compile_imagination, validated).
    monkeypatch.setattr(torch.distributions.Distribution, "_validate_args", True)
    den, reward_end, ac = models(params)
    env = env_of(params, den, reward_end, tmp_path)
    with torch.no_grad():  # every row ends at once: the step takes the restart path
        reward_end.head[-1].bias[-2:].copy_(torch.tensor([-30.0, 30.0]))
    obs, start = env.reset()
    state = ac.burn_in(start.context_obs, start.context_mask)
    for _ in range(2):
        with counting_host_reads() as reads:
            logits, value, state = ac(obs, state)
            dist = categorical(logits)
            action = dist.sample()
            step = env.step(action)
            _ = dist.log_prob(action), dist.entropy()
            with torch.no_grad():
                ac(step.final_obs, state)
            state = ac.restart_rows(state, step.restart.rows, step.restart.context_obs, step.restart.context_mask)
        assert bool(step.restart.rows.all())
        assert reads.count == 1
        obs = step.obs
    with counting_host_reads() as reads:
        torch.distributions.Categorical(logits=logits).sample()
    assert reads.count > 0  # the counter sees a validated distribution's reads


def training_segment(p: Params, steps: int):
    """A segment of random frames and actions, some rewards and ends, padding at one row's start."""
    from benchmarks.bench import BenchSegment

    gen = torch.Generator().manual_seed(2)
    b = 3
    mask = torch.ones(b, steps + 1, dtype=torch.bool)
    mask[0, :2] = False
    return BenchSegment(
        obs=torch.rand(b, steps + 1, 3, SIZE, SIZE, generator=gen) * 2 - 1,
        act=torch.randint(0, NUM_ACTIONS, (b, steps), generator=gen),
        rew=torch.randint(-1, 2, (b, steps), generator=gen).float(),
        terminated=torch.rand(b, steps, generator=gen) < 0.2,
        truncated=torch.zeros(b, steps, dtype=torch.bool), mask=mask,
    )


def loss_and_grads(model: torch.nn.Module, loss_fn: Callable, seg) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The loss function's tensors and the model's gradients of its first one, from RNG seed 3."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the denoiser's noise levels and noise: the same draws in both runs
    out = loss_fn(seg)
    outs = list(out) if isinstance(out, tuple) else [out]
    outs[0].backward()
    return [o.detach() for o in outs], [q.grad.clone() for q in model.parameters()]


@pytest.mark.parametrize("model_name", ["denoiser", "denoiser_estimate", "reward_end"])
def test_world_model_training_losses_are_one_graph(params: Params, model_name: str) -> None:
    """D's autoregressive loss (its noise drawn inside, two targets; `denoiser_estimate`: with the
    official padded-target feedback, docs/official-parity.md D2) and R's loss each compile as
    one graph, forward and backward, with eager's loss and gradients."""
    if model_name == "denoiser_estimate":
        den_cfg = dataclasses.replace(params.world_model.denoiser, padded_target_feedback="estimate")
        params = dataclasses.replace(params, world_model=dataclasses.replace(params.world_model, denoiser=den_cfg))
        model_name = "denoiser"
    den, reward_end, _ = models(params)
    model, loss_fn = (den, den.loss) if model_name == "denoiser" else (reward_end, reward_end.loss_terms)
    model.train()
    steps = params.world_model.denoiser.training_segment_steps if model_name == "denoiser" else 5
    seg = training_segment(params, steps)
    eager = loss_and_grads(model, loss_fn, seg)
    compiled = loss_and_grads(model, fullgraph(loss_fn), seg)
    for a, b in zip(compiled[0], eager[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compile_imagination_compiles_with_fullgraph(params: Params, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile_imagination compiles both parts of the step with fullgraph=True (a graph break is an
    error there, not a silent split): the transition with CUDA graphs (reduce-overhead), the
    actor-critic's forward without (diamond.agent.policy.compiled_forward)."""
    from diamond.agent.policy import compiled_forward

    calls: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    den, reward_end, ac = models(params)
    sampler = DiffusionSampler(den, params.world_model.sampler, quantization=params.world_model.denoiser.quantization)
    ImaginationEnv(sampler, reward_end, None, params.world_model.denoiser.num_conditioning_frames,  # type: ignore[arg-type]
                   BATCH, 2, torch.device("cpu"), compile=True)
    compiled_forward(ac)
    assert calls == [{"mode": "reduce-overhead", "fullgraph": True}, {"fullgraph": True}]
