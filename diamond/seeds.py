"""Every random stream of a run, derived from the run seed: the one registry.

A stream is an id mixed with the run seed by numpy's SeedSequence, so streams are independent
of each other and reproducible from (seed, id) alone. Each purpose has its own id below; no two
purposes share one (tests/test_seeds.py). Ids of a stage never change once results exist under
them: changing one changes that stage's results.

Stream ids, per (run) seed:

| id | stage | purpose |
| --- | --- | --- |
| 1 | collect | the uniform policy's action draws (`stream_rng`) |
| 2 | train-world-model, study | segment sampling for D and R (`stream_rng`) |
| 3 | train-world-model, study | the sampler's noise in the fidelity measurement / study rollouts (`derived_seed`) |
| 11, 12, 13 | train-agent | segment sampling, the collecting policy, torch's initial seed |
| (0, 1) | train-agent | the training environment (`derived_seed(seed, 0, 1)`) |
| (epoch, 2), (epoch, 3) | train-agent | the test policy and test environment after `epoch` |
| 21, 23 | evaluate | test episodes (each then gets its own streams, diamond/agent/evaluation.py), imagination (22 is retired) |
| 7919 | train-world-model, evaluate | the held-out episodes of the fidelity measurement (diamond/world_model/fidelity.py; their uniform policy then uses stream 1 of that seed) |

The environment's own seed (diamond/env/atari.py) and the collect stage's environment use the run
seed itself; evaluate seeds its fidelity sampler with the run seed itself (raw, not a stream).
"""

from __future__ import annotations

import numpy as np

COLLECT_POLICY = 1
WORLD_MODEL_SEGMENTS = 2
WORLD_MODEL_FIDELITY = 3
AGENT_SEGMENTS = 11
AGENT_POLICY = 12
AGENT_TORCH = 13
AGENT_TRAIN_ENV = (0, 1)  # (epoch 0, purpose 1): one training environment for the whole run
AGENT_TEST_POLICY = 2  # per epoch: derived_seed(seed, epoch, AGENT_TEST_POLICY)
AGENT_TEST_ENV = 3  # per epoch: derived_seed(seed, epoch, AGENT_TEST_ENV)
EVALUATE_TEST_EPISODES = 21
EVALUATE_IMAGINATION = 23
HELDOUT = 7919
# The study trains and rolls out as train-world-model does (paper section 5.1 compares variants
# under the same streams).
STUDY_SEGMENTS = WORLD_MODEL_SEGMENTS
STUDY_ROLLOUTS = WORLD_MODEL_FIDELITY

# The per-run stream ids (two-entry SeedSequences [seed, id]); tests/test_seeds.py checks they
# are distinct.
STREAMS: dict[str, int] = {
    "COLLECT_POLICY": COLLECT_POLICY, "WORLD_MODEL_SEGMENTS": WORLD_MODEL_SEGMENTS,
    "WORLD_MODEL_FIDELITY": WORLD_MODEL_FIDELITY, "AGENT_SEGMENTS": AGENT_SEGMENTS, "AGENT_POLICY": AGENT_POLICY,
    "AGENT_TORCH": AGENT_TORCH, "EVALUATE_TEST_EPISODES": EVALUATE_TEST_EPISODES,
    "EVALUATE_IMAGINATION": EVALUATE_IMAGINATION, "HELDOUT": HELDOUT,
}


def stream_rng(seed: int, stream: int) -> np.random.Generator:
    """numpy generator of stream `stream` of `seed`."""
    return np.random.default_rng([seed, stream])


def derived_seed(seed: int, *keys: int) -> int:
    """An independent 32-bit seed for one purpose (environment of an epoch, test episodes, ...)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def episode_seeds(seed: int, episode: int) -> tuple[int, int]:
    """(environment seed, action-stream seed) of test episode `episode` of an evaluation seeded `seed`
    (`seed` is itself `derived_seed(run seed, EVALUATE_TEST_EPISODES)`)."""
    env_seed, policy_seed = np.random.SeedSequence([seed, episode]).generate_state(2)
    return int(env_seed), int(policy_seed)
