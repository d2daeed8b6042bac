"""One resume scheme for both training loops (docs/architecture.md, "Resume").

train-world-model (diamond/world_model/loop.py) and train-agent (diamond/agent/loop.py) save their
whole training state atomically and, on a rerun, continue from it only when its resume key
matches. Both use the pieces here:

- `resume_key(**parts)`: the hash of everything the training depends on (config sections as
  YAML data, game, seed, inputs), stored under `RESUME_KEY` in the saved state;
- `rng_state` / `restore_rng_state`: the numpy generators of the loop by name, plus torch's CPU
  and CUDA generators, saved flat beside the models (keys `<name>`, `torch_rng`, `cuda_rng`);
- `curve_csv_bytes`: the loss curve rows as CSV, the given columns first.

A resumed run therefore continues the same random streams and ends with the same weights as an
uninterrupted one (tests/test_train_world_model_resume.py, tests/test_train_agent_resume.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

RESUME_KEY = "resume_key"


def resume_key(**parts: Any) -> str:
    """A short stable hash of `parts` (JSON data); a saved state resumes only under the same key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def rng_state(generators: dict[str, np.random.Generator]) -> dict[str, Any]:
    """The state of the named numpy generators and of torch's CPU and CUDA generators."""
    state: dict[str, Any] = {name: g.bit_generator.state for name, g in generators.items()}
    state["torch_rng"] = torch.get_rng_state()
    state["cuda_rng"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, np.random.Generator]) -> None:
    """Put the generators back to what `rng_state` saved in `state`."""
    for name, g in generators.items():
        g.bit_generator.state = state[name]
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def curve_csv_bytes(rows: Sequence[dict[str, Any]], first: Sequence[str]) -> bytes:
    """The curve as CSV: the `first` columns, then every other column of the rows, sorted."""
    columns = list(first) + sorted({k for row in rows for k in row} - set(first))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()
