"""Which params keys each stage reads: declared once, here.

Read by the stages themselves (`stages.common.stage_sections`: what each MLflow run logs and
hashes), by stages/provenance.py (the provenance keys that decide what reruns in both tools)
and checked against dvc.yaml's `params:` lists by tests/test_pipeline_dvc.py. Standard library
only: the Snakefile loads it on every invocation.
"""

from __future__ import annotations

# The params keys each stage reads (dotted keys for parts of a section). Changing any other
# key leaves the stage's outputs valid, so neither pipeline reruns it. Not listed although the GPU
# stages read it: `runs_per_gpu`, a scheduling setting (how many runs share a GPU, each capped at
# 1/K of its memory: diamond/allocator.py cap_gpu_memory) that moves no result, so a tree built
# packed is current unpacked and the other way round.
STAGE_PARAMS: dict[str, list[str]] = {
    "collect": ["env", "collect"],
    # fidelity of the trained world model is measured here, on held-out real episodes
    "train-world-model": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "tf32", "env", "world_model",
        # R's training segments are horizon + conditioning frames long (diamond/config.py DERIVED)
        "actor_critic.horizon",
        "evaluate.fidelity_episodes", "evaluate.fidelity_horizons", "evaluate.gif_frames",
    ],
    "train-agent": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "tf32", "compile_imagination", "env",
        "world_model", "actor_critic", "agent",
    ],
    "evaluate": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "tf32", "env", "world_model", "actor_critic",
        "evaluate", "aggregate.method_name",
    ],
    # games, seeds and released.games choose which score files enter the table
    "aggregate": ["games", "seeds", "aggregate", "released.games", "released.method_name"],
    # not released.games: adding a game must not rerun the others
    "import-released": [
        "env", "world_model", "actor_critic", "released.dir", "released.repo_id", "released.revision",
        "released.filename", "released.seed",
    ],
    "evaluate-released": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "tf32", "env", "world_model", "actor_critic",
        "evaluate", "released.method_name", "released.seed",
    ],
    # not study.variants nor study.seeds: the job's variant comes on its command line, so that
    # adding a variant or a seed reruns no other job
    "study": [
        "device", "channels_last", "compile_denoiser", "reuse_freed_memory", "tf32", "world_model.denoiser",
        "world_model.sampler", "world_model.denoiser_optimizer", "world_model.batch_size", "study.dataset",
        "study.denoiser_steps", "study.heldout_episodes", "study.rollouts_per_episode", "study.horizons",
    ],
    "study-report": ["study"],
}
