"""Optimisation shared by the world model and the actor-critic (docs/architecture.md §3.5).

AdamW with a linear learning-rate warm-up and gradient-norm clipping, and a loop that draws
segments from a sampler and steps a trainer on a loss function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from diamond.config import OptimizerConfig, Params
from diamond.io import ArtifactError

# Official configure_opt (src/utils.py, after minGPT): only the weights of these layers decay ...
DECAYED_WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTMCell, nn.LSTM)
# ... and the weights of these never do (nor does any bias).
UNDECAYED_WEIGHT_MODULES = (nn.LayerNorm, nn.Embedding, nn.GroupNorm)


def weight_decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) parameters of `model`, in module order, split as the official
    configure_opt does (src/utils.py): weights of Linear, Conv and LSTM(Cell) layers decay (LSTM:
    weight_ih_l*/weight_hh_l*), biases and the weights of Embedding and normalisation layers do
    not. A parameter of any other kind of module is an error, as it is there.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            is_weight = name.endswith("weight") or name.startswith("weight_")
            if "bias" in name:
                no_decay.append(p)
            elif is_weight and isinstance(module, DECAYED_WEIGHT_MODULES):
                decay.append(p)
            elif is_weight and isinstance(module, UNDECAYED_WEIGHT_MODULES):
                no_decay.append(p)
            else:
                full = f"{module_name}.{name}" if module_name else name
                raise ValueError(
                    f"weight decay: parameter {full!r} of a {type(module).__name__} is neither a bias nor the "
                    "weight of a Linear/Conv/LSTM (decayed) or Embedding/GroupNorm/LayerNorm (not decayed) layer"
                )
    return decay, no_decay


class Trainer:
    """One optimiser for one model: AdamW, linear warm-up over `warmup_steps`, grad-norm clipping.

    Two parameter groups, as in the official configure_opt (src/utils.py): group 0 (weights of
    Linear, Conv and LSTM layers) decays by `weight_decay`, group 1 (biases, Embedding and
    GroupNorm weights) does not decay (`weight_decay_groups`).

    AdamW runs its multi-tensor (`foreach`) implementation on every device: PyTorch's default on
    CUDA already, and on CPU the same updates bit for bit as the per-parameter loop it defaults
    to there (tests/test_weight_decay.py), in fewer Python-level calls. Not `fused=True`: its
    kernel rounds differently (about 1e-7 apart after 20 steps on CPU), so results would change.
    """

    def __init__(self, model: nn.Module, opt_cfg: OptimizerConfig) -> None:
        self.model = model
        self.cfg = opt_cfg
        self.num_steps = 0
        # AdamW is built on first use: constructing a torch optimiser imports torch._dynamo
        # (~1.4 s of CPU), which a stage that only loads a checkpoint to run the model (evaluate,
        # play, export) never needs. A state loaded before then waits in `_saved_state`.
        self._optimizer: torch.optim.AdamW | None = None
        self._saved_state: dict[str, Any] | None = None

    @property
    def optimizer(self) -> torch.optim.AdamW:
        if self._optimizer is None:
            decay, no_decay = weight_decay_groups(self.model)
            self._optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=self.cfg.lr, eps=self.cfg.eps, foreach=True,
            )
            if self._saved_state is not None:
                self._optimizer.load_state_dict(self._saved_state)
                for group in self._optimizer.param_groups:  # a saved group's settings replace ours, foreach too
                    group["foreach"] = True
                self._saved_state = None
        return self._optimizer

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step `step` (0-based): lr * min(1, (step + 1) / warmup_steps),
        or with `warmup_starts_at_zero` lr * min(1, step / warmup_steps), the official LambdaLR
        (src/utils.py:177-181, stepped after each update in src/trainer.py:380-382), whose first
        step has lr 0: AdamW then only fills its moments (docs/official-parity.md, row O3)."""
        if self.cfg.warmup_steps <= 0:
            return self.cfg.lr
        done = step if self.cfg.warmup_starts_at_zero else step + 1
        return self.cfg.lr * min(1.0, done / self.cfg.warmup_steps)

    def step(self, loss: Tensor) -> dict[str, float]:
        """Backpropagate `loss`, clip, and take one AdamW step; returns grad_norm and lr."""
        lr = self.lr_at(self.num_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.num_steps += 1
        return {"grad_norm": float(grad_norm), "lr": lr}

    def state_dict(self) -> dict[str, Any]:
        if self._saved_state is not None:
            optimizer = self._saved_state  # loaded and never stepped since: saved back as it came
        else:
            optimizer = self.optimizer.state_dict()
        return {"optimizer": optimizer, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the AdamW state (into the optimiser when it is built); one saved with another
        group layout (e.g. the former single group that decayed every parameter) is a one-line
        ArtifactError."""
        saved = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        expected = [len(group) for group in weight_decay_groups(self.model)]
        if saved != expected:
            raise ArtifactError(
                f"optimizer state has parameter groups of sizes {saved}, this model's (decayed, not decayed) "
                f"groups have {expected}: it was saved by an older version or for another model; retrain"
            )
        self._optimizer, self._saved_state = None, state["optimizer"]
        self.num_steps = int(state["num_steps"])


def read_metrics(metrics: dict[str, Tensor]) -> dict[str, float]:
    """0-d tensors -> floats, in one device-to-host copy instead of one `.item()` (a host sync on
    a GPU) each. The floats are those `.item()` gives: the stack copies the values exactly (bool
    and bf16 values are exact in float32) and `tolist` widens each to a Python float as `.item()`."""
    values = torch.stack([m.detach().float() for m in metrics.values()]).tolist()
    return dict(zip(metrics, values))


class SegmentSource(Protocol):
    """`diamond.data.SegmentSampler`: `.sample(batch_size, num_steps) -> Segment`."""

    def sample(self, batch_size: int, num_steps: int) -> Any: ...


LossFn = Callable[[Any], tuple[Tensor, dict[str, float]]]


def training_step(trainer: Trainer, loss_fn: LossFn, seg: Any) -> dict[str, float]:
    """One update of `trainer`'s model on the batch `seg`: the loss's metrics, grad_norm and lr
    (official src/trainer.py `train_component`, one iteration; tests/test_official_updates.py)."""
    loss, metrics = loss_fn(seg)
    return {**metrics, **trainer.step(loss)}


def train_steps(
    trainer: Trainer,
    loss_fn: LossFn,
    sampler: SegmentSource,
    batch_size: int,
    num_steps: int,
    segment_len: int,
    device: torch.device,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Run `num_steps` optimiser steps on fresh segments; `on_log(step, metrics)` after each.

    `step` is the trainer's running count (1-based after the step), so curves continue across
    calls and resumes. Returns the last step's metrics.
    """
    trainer.model.train()
    metrics: dict[str, float] = {}
    for _ in range(num_steps):
        seg = sampler.sample(batch_size, segment_len).to_torch(device)
        metrics = training_step(trainer, loss_fn, seg)
        if on_log is not None:
            on_log(trainer.num_steps, metrics)
    return metrics


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA (official src/trainer.py sets the
    matmul flag; PyTorch's cuDNN flag is on by default). Off: plain fp32 everywhere. CPU ignores both."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def set_memory_format(channels_last: bool, *models: nn.Module) -> None:
    """Move the models' 4-D weights to channels-last (NHWC) or back, in place.

    Convolutions follow their weights' layout, so the whole network then runs on NHWC kernels
    (speed figures: docs/results.md, "Speed switches"). Results equal the default layout's up to
    float rounding. Parameters keep their identity, so an optimiser built before the move stays
    valid.
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for model in models:
        model.to(memory_format=layout)


def compile_networks(enabled: bool, *networks: nn.Module) -> None:
    """torch.compile the networks in place when `enabled` (after set_memory_format: the compiled
    code is specialised to the weights' layout).

    In place (nn.Module.compile), so parameter names, state dicts and checkpoints are those of
    the eager network. Inductor fuses the GroupNorm/SiLU/add chains around the convolutions
    (speed and compilation time: docs/results.md, "Speed switches"). Results equal eager mode's
    up to float rounding.
    """
    if enabled:
        for network in networks:
            network.compile()


def apply_speed_switches(p: Params, models: tuple[nn.Module, ...], denoiser_net: nn.Module | None) -> None:
    """The params' speed switches, in the one order every stage uses: `tf32`, then `channels_last`
    on `models`, then `compile_denoiser` on the denoiser's U-Net (after the layout change, which
    compiled code is specialised to). `reuse_freed_memory` is a process setting, applied at stage
    start (diamond/allocator.py). None changes results beyond float rounding (tests/test_speed_switches.py)."""
    set_tf32(p.tf32)
    set_memory_format(p.channels_last, *models)
    if denoiser_net is not None:
        compile_networks(p.compile_denoiser, denoiser_net)
