"""diamond.allocator: with reuse_freed_memory, a freed large tensor's pages serve the next one.

Counted in page faults, not time: each run is a fresh child process (the setting is process-wide
and one-way) that allocates, fills and frees a 64 MiB tensor 20 times on one thread.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


CHILD = """
import json, resource, sys, torch
from diamond.allocator import reuse_freed_memory
torch.set_num_threads(1)
in_force = reuse_freed_memory(sys.argv[1] == "on")
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MiB, filled, then freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"in_force": in_force, "faults": faults}))
"""
PAGES = 64 * 2**20 // 4096


def child(switch: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, switch], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_pages_are_reused_only_with_the_switch():
    off, on = child("off"), child("on")
    assert off["in_force"] is False and on["in_force"] is True
    # As found, glibc maps each 64 MiB block afresh and unmaps it on free: every page faults again.
    assert min(off["faults"][1:]) > PAGES // 2
    # Kept in the process, freed blocks serve the next tensors once the heap holds one that fits
    # (a few rounds: torch's small allocations land between them): their pages are already there.
    assert max(on["faults"][-5:]) < PAGES // 20


def test_the_gpu_memory_cap_leaves_cpu_runs_and_whole_gpus_alone():
    import torch

    from diamond.allocator import cap_gpu_memory

    assert cap_gpu_memory(torch.device("cpu"), 4) is None  # params.yaml's runs_per_gpu on a CPU run
    assert cap_gpu_memory(torch.device("cuda"), 1) is None  # one run per GPU: no cap, no CUDA call


def test_the_gpu_memory_cap_is_one_over_k_of_the_current_gpu(monkeypatch):
    """What the stages ask torch for, checked without a GPU: 1/K of the device resolve_device
    names (`cuda`, no index: the current device)."""
    import torch

    from diamond.allocator import cap_gpu_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    assert cap_gpu_memory(torch.device("cuda"), 4) == 0.25
    assert cap_gpu_memory(torch.device("cuda:1"), 2) == 0.5
    assert calls == [(0.25, 3), (0.5, 1)]


GPU_CHILD = """
import json, sys, torch
from diamond.allocator import cap_gpu_memory
k = int(sys.argv[1])
fraction = cap_gpu_memory(torch.device("cuda"), k)
total = torch.cuda.get_device_properties(0).total_memory
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(64, 3, 3, padding=1)).cuda()
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
x = torch.randn(32, 3, 64, 64, device="cuda")
for _ in range(3):
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()
try:  # a tensor of 60% of the GPU: beyond a cap of 1/2
    torch.empty(int(0.6 * total), dtype=torch.uint8, device="cuda")
    refused = False
except torch.OutOfMemoryError:
    refused = True
print(json.dumps({"fraction": fraction, "refused": refused,
                  "weights": [w.double().sum().item() for w in net.parameters()]}))
"""


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_the_gpu_memory_cap_refuses_more_than_the_share_and_moves_no_number():
    """Two runs per GPU: the process cannot take more than half the GPU, and a few training steps
    give the uncapped process's weights."""
    def run(k: int) -> dict:
        done = subprocess.run([sys.executable, "-c", GPU_CHILD, str(k)], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    capped, whole = run(2), run(1)
    assert capped["fraction"] == 0.5 and capped["refused"]
    assert whole["fraction"] is None and not whole["refused"]
    assert capped["weights"] == pytest.approx(whole["weights"], rel=1e-5)
