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
