"""The compute setup of the stages that may run on a GPU (train-world-model, train-agent,
evaluate, study): a module of its own so that the other stages do not depend on the allocator."""

from __future__ import annotations

import torch

from diamond.allocator import cap_gpu_memory, reuse_freed_memory
from diamond.config import Params
from stages.common import resolve_device


def compute_setup(params: Params) -> tuple[torch.device, dict[str, str]]:
    """The device of a stage that may run on a GPU, and the process-wide memory settings in force,
    as the tags its MLflow run records: glibc's reuse of freed memory and the fraction of the GPU's
    memory this process may take (1/runs_per_gpu; diamond/allocator.py). Neither changes results,
    so runs_per_gpu is no rerun key."""
    device = resolve_device(params)
    reuse = reuse_freed_memory(params.reuse_freed_memory)
    share = cap_gpu_memory(device, params.runs_per_gpu)
    return device, {"reuse_freed_memory_in_force": str(reuse), "gpu_memory_fraction": str(share)}
