"""Kill train-agent mid-run, restart it: same real steps and the same episodes as an uninterrupted
run, nothing duplicated or lost; then a params change starts fresh instead of resuming."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_params
from agent_helpers import agent_params_dict, agent_paths, prepare_run, run_stage, stage_args, stage_env
from diamond.config import OFFICIAL_BEHAVIOUR, params_from_dict
from diamond.data import EpisodeStore
from diamond.io import ArtifactError, load_torch, read_json
from stages.train_agent import run_key

pytestmark = pytest.mark.slow


def _episodes(root: Path) -> list[tuple[bytes, bytes, bytes]]:
    store = EpisodeStore(root)
    return [(store[i].act.tobytes(), store[i].rew.tobytes(), store[i].obs.tobytes()) for i in range(len(store))]


def _kill_after_checkpoint_with_newer_episodes(args: list[str], cwd: Path, env: dict, state_dir: Path) -> int:
    """Start the stage; SIGKILL it once a checkpoint exists and episodes were appended after it."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                saved = load_torch(state_dir / "state.pt")["num_episodes"]
                now = json.loads((state_dir / "dataset" / "manifest.json").read_text())["num_episodes"]
            except (ArtifactError, FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.05)
                continue
            if now > saved:
                proc.kill()
                proc.wait()
                return saved
            time.sleep(0.05)
        raise AssertionError(f"no kill point reached (rc={proc.poll()}): {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run_whole_and_killed(tmp_path: Path, params_dict: dict) -> tuple[Path, Path, Path, dict[str, Path], int]:
    """Run train-agent once uninterrupted and once killed after a checkpoint and restarted;
    return the params file, both run folders, the killed run's paths and its saved episode count."""
    params, run = prepare_run(tmp_path, params_dict, train_world_model=False)
    # Two copies of the same inputs: one run is left alone, the other is killed and restarted.
    other = tmp_path / "interrupted"
    shutil.copytree(run, other)

    done = run_stage("train_agent", params, tmp_path, **agent_paths(run))
    assert done.returncode == 0, done.stderr[-3000:]

    paths = agent_paths(other)
    saved = _kill_after_checkpoint_with_newer_episodes(
        stage_args("train_agent", params, tmp_path, **paths), tmp_path, stage_env(tmp_path), paths["state_dir"])
    assert not paths["out_checkpoint"].exists()  # outputs appear only on completion
    # The checkpoint had an episode in progress in the dataset (official src/coroutines/collector.py),
    # which the killed run then grew or ended: the resume must put it back as it was.
    checkpoint = load_torch(paths["state_dir"] / "state.pt")
    assert checkpoint["collection"]["episode"]["stored_index"] == saved - 1
    # A8: with rows going on across updates, the imagined rows in progress (frames, R's and the
    # actor-critic's LSTM states, step counters) are state too
    assert (checkpoint["imagination"] is not None) == params_dict["actor_critic"]["continue_rows_across_updates"]
    done = run_stage("train_agent", params, tmp_path, **paths)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    return params, run, other, paths, saved


def test_killed_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    params_dict = agent_params_dict(total_env_steps=400, checkpoint_every_epochs=2, test_every_epochs=3)
    params, run, other, paths, saved = _run_whole_and_killed(tmp_path, params_dict)

    uninterrupted, resumed = read_json(run / "agent.json"), read_json(other / "agent.json")
    assert resumed["env_steps"] == uninterrupted["env_steps"] == 400
    assert EpisodeStore(other / "dataset").num_steps == 400
    a, b = _episodes(run / "dataset"), _episodes(other / "dataset")
    assert len(b) == len(a) > saved
    assert a == b  # same episodes, same order: none lost, none duplicated
    # Checkpoints do not cut games (the game in progress is saved and continued): only the
    # initial collection's last episode and the one in progress when the budget ran out are cut.
    store = EpisodeStore(run / "dataset")
    assert sum(bool(store[i].truncated[-1]) for i in range(len(store))) <= 2
    for key in ("epochs", "episodes", "actor_critic_steps", "denoiser_steps", "final_test_return_mean"):
        assert resumed[key] == uninterrupted[key], key
    np.testing.assert_array_equal(
        load_torch(run / "agent.pt")["actor_critic"]["actor.weight"].numpy(),
        load_torch(other / "agent.pt")["actor_critic"]["actor.weight"].numpy(),
    )

    # A changed params file does not resume the saved state: it starts fresh, and says why.
    saved_key = load_torch(paths["state_dir"] / "state.pt")["resume_key"]
    assert saved_key == run_key(params_from_dict(params_dict), "Breakout", 0, paths["dataset"], paths["world_model"])
    params_dict["agent"]["epsilon"] = 0.5
    write_params(params, params_dict)
    proc = subprocess.Popen(stage_args("train_agent", params, tmp_path, **paths), cwd=tmp_path,
                            env=stage_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline() if proc.stdout else ""
    finally:
        proc.kill()
        proc.wait()
    assert f"started fresh (saved state has params/input hash {saved_key}" in first


def test_killed_run_with_the_official_switches_resumes_to_the_same_result(tmp_path: Path) -> None:
    # Every official-behaviour switch on (diamond.config.OFFICIAL_BEHAVIOUR, docs/official-parity.md).
    # The segment placements (C3, C7, C8) draw differently from the same stream; the re-saved
    # training frames (C9) make each episode's write history state: the resumed run must record,
    # and so train on, the same re-saved frames; the imagined rows continue across updates (A8),
    # so the rows in progress are saved and restored.
    params_dict = agent_params_dict(total_env_steps=400, checkpoint_every_epochs=2, test_every_epochs=3)
    for key, (official, _) in OFFICIAL_BEHAVIOUR.items():
        section = params_dict
        *parents, leaf = key.split(".")
        for part in parents:
            section = section[part]
        section[leaf] = official
    _, run, other, _, saved = _run_whole_and_killed(tmp_path, params_dict)
    assert _episodes(run / "dataset") == _episodes(other / "dataset")
    a, b = EpisodeStore(run / "dataset"), EpisodeStore(other / "dataset")
    histories = [a.write_history(i) for i in range(len(a))]
    assert histories == [b.write_history(i) for i in range(len(b))]
    assert max(len(h or []) for h in histories) > 1  # some episode was written at several collection calls
    whole, resumed = _tensors(load_torch(run / "agent.pt")), _tensors(load_torch(other / "agent.pt"))
    assert whole.keys() == resumed.keys() and any(k.startswith("world_model.") for k in whole)
    for key, value in whole.items():  # the models trained on the re-saved frames are the same
        np.testing.assert_array_equal(value.numpy(), resumed[key].numpy(), err_msg=key)


def _tensors(d: dict, prefix: str = "") -> dict:
    """The checkpoint's tensors under actor_critic and world_model, by dotted key."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and (prefix or k in ("actor_critic", "world_model")):
            out.update(_tensors(v, key + "."))
        elif prefix and hasattr(v, "numpy"):
            out[key] = v
    return out
