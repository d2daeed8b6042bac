"""Memory settings of a stage process: keep freed CPU memory in the process instead of handing it
back to the OS (glibc malloc), and cap the process's share of a GPU shared by several runs.

glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh
`mmap` and unmaps it on free, and it trims the heap's top once a large block there is freed. The
paper-size denoiser's activations are 32-64 MiB each (batch 32, 64-128 channels, 64x64), so every
training step maps, page-faults and zero-fills hundreds of MiB anew: on the 2-core CPU that was
11-17% of the denoiser's step and two thirds of R's (`python -m benchmarks.bench --reuse-freed-memory`
times both ways in one run). With mmap turned off and trimming out of reach, a freed block is
reused by the next step's tensor of the same size, as PyTorch's caching allocator does on CUDA.
Numbers are unchanged, bit for bit: only where memory comes from.

The cost is memory: the heap never shrinks, and it grows for the first few steps, because torch's
small allocations land between the freed blocks until enough of them fit the requests
(`tests/test_allocator.py`): the paper-size bench process peaked at 9.4 GB resident instead of 8.1.
"""

from __future__ import annotations

import ctypes

import torch

# mallopt parameters (glibc's <malloc.h>).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Trim the heap only once this much is free at its top: never, in practice.
NEVER_TRIM_BYTES = 2**31 - 1


def reuse_freed_memory(enabled: bool) -> bool:
    """Turn glibc's per-allocation mmap and heap trimming off for this process when `enabled`.

    Process-wide and one-way (call it once, at start-up). Returns whether the setting is in force:
    False when not `enabled` or where the C library has no working `mallopt` (musl, macOS), which
    leaves the allocator as it was.
    """
    if not enabled:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0.
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM_BYTES) == 1


def cap_gpu_memory(device: torch.device, runs_per_gpu: int) -> float | None:
    """Cap this process's share of `device`'s memory at 1/runs_per_gpu, for K runs on one GPU.

    PyTorch's caching allocator refuses to hold more than the fraction
    (`torch.cuda.set_per_process_memory_fraction`, https://pytorch.org/docs/stable/generated/
    torch.cuda.set_per_process_memory_fraction.html): when a block would pass it, it first frees its
    cached blocks and retries, and raises an out-of-memory error only if the live tensors themselves
    need more. So one run cannot starve the K-1 others, and the cap moves no number: the same
    kernels run on the same data (train-agent at the paper's config peaked at 7.4 GB on an H200,
docs/results.md, "GPU measurement"; on an 80 GB GPU K up to about 10 fit). The one thing
    the cap can change is a convolution algorithm whose workspace no longer fits, picked by cuDNN
    in its place: the same result up to float rounding, as any change of cuDNN algorithm.

    Returns the fraction in force (None on CPU or with runs_per_gpu 1: no cap).
    """
    if device.type != "cuda" or runs_per_gpu == 1:
        return None
    fraction = 1.0 / runs_per_gpu
    # an index, not torch.device("cuda") as stages.common.resolve_device returns it: torch
    # refuses a CUDA device without one here ("Expected a torch.device with a specified index")
    index = torch.cuda.current_device() if device.index is None else device.index
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction
