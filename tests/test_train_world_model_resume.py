"""Stage train-world-model: outputs, resume after more steps are asked, and resume after a kill."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_params_dict, write_params
from diamond.config import params_from_dict
from diamond.data import EpisodeStore
from diamond.env.atari import make_env, num_actions
from diamond.env.collector import Collector, UniformPolicy
from diamond.io import ArtifactError, read_json
from diamond.models.reward_end import class_counts, log_priors
from diamond.world_model.model import load_world_model, read_checkpoint
from stages import train_world_model as stage

GAME = "Breakout"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A real (small) uniform-policy dataset of Breakout."""
    root = tmp_path_factory.mktemp("data") / "dataset_initial"
    d = tiny_params_dict()
    p = params_from_dict(d)
    store = EpisodeStore(root, game=GAME, num_actions=num_actions(GAME))
    collector = Collector(make_env(GAME, 0, True, p.env), UniformPolicy(num_actions(GAME), np.random.default_rng(0)), store)
    collector.collect(150)
    collector.flush()
    return root


@pytest.fixture(autouse=True)
def one_thread_and_local_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions and no oversubscription on shared CPUs
    yield
    torch.set_num_threads(threads)


def params_file(path: Path, steps: int, every: int = 2) -> Path:
    d = tiny_params_dict()
    d["world_model"].update(denoiser_steps=steps, reward_end_steps=steps, checkpoint_every_steps=every, log_every_steps=1)
    d["evaluate"].update(fidelity_horizons=[1, 2], gif_frames=3)
    return write_params(path, d)


def stage_args(params: Path, out: Path, dataset: Path) -> list[str]:
    return [
        "--params", str(params), "--game", GAME, "--seed", "0", "--dataset", str(dataset),
        "--out-checkpoint", str(out / "world_model.pt"), "--out-metrics", str(out / "world_model.json"),
        "--out-curve", str(out / "world_model_curve.csv"), "--out-media", str(out / "media"),
    ]


def run_in_process(params: Path, out: Path, dataset: Path) -> None:
    ns = argparse.Namespace(
        params=str(params), game=GAME, seed=0, dataset=dataset, out_checkpoint=out / "world_model.pt",
        out_metrics=out / "world_model.json", out_curve=out / "world_model_curve.csv", out_media=out / "media",
    )
    from diamond.config import load_params

    stage.run(ns, load_params(params))


def assert_same_weights(a: dict, b: dict) -> None:
    """Two world-model checkpoints hold the same D and R weights, bit for bit."""
    for name in ("denoiser", "reward_end"):
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}.{k} differs after resume"


def adam_steps(ckpt: dict, name: str) -> set[int]:
    return {int(s["step"]) for s in ckpt[name]["optimizer"]["state"].values()}


@pytest.mark.slow
def test_more_steps_resume_exactly(tmp_path, dataset, capsys, monkeypatch):
    # 3 steps, then 5 asked of the same run: continues from 3 and matches a straight 5-step run.
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    monkeypatch.setenv("DIAMOND_PROGRESS_SECONDS", "0")  # a progress line at every step
    run_in_process(params_file(tmp_path / "p3.yaml", 3), resumed, dataset)
    first = read_checkpoint(resumed / "world_model.pt")
    assert first["denoiser_trainer"]["num_steps"] == 3 and adam_steps(first, "denoiser_trainer") == {3}
    assert not (resumed / "world_model.pt.partial").exists()
    run_in_process(params_file(tmp_path / "p5.yaml", 5), resumed, dataset)
    out = capsys.readouterr()
    assert "resumed from" in out.out
    # Progress lines (stderr is not a terminal here), counted from where the resumed run starts.
    lines = [line for line in out.err.splitlines() if line.startswith("train-world-model Breakout-0: ")]
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["1/3", "2/3", "4/5"]
    assert "ETA" in lines[-1] and "steps/s" in lines[-1]
    run_in_process(params_file(tmp_path / "p5b.yaml", 5), straight, dataset)
    a, b = read_checkpoint(resumed / "world_model.pt"), read_checkpoint(straight / "world_model.pt")
    for name in ("denoiser_trainer", "reward_end_trainer"):
        assert a[name]["num_steps"] == b[name]["num_steps"] == 5
        assert adam_steps(a, name) == {5}  # the optimiser state continued, not restarted
    assert_same_weights(a, b)
    # The curve of the resumed run is whole (iterations 1..5) and equal to the straight run's.
    curve_a = (resumed / "world_model_curve.csv").read_text().splitlines()
    assert curve_a == (straight / "world_model_curve.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in curve_a[1:]] == ["1", "2", "3", "4", "5"]
    # Outputs: metrics with fidelity beside the repeat-last baseline, a GIF, a loadable model.
    m = read_json(resumed / "world_model.json")
    h1 = m["fidelity"]["open_loop"]["horizons"]["1"]
    assert {"mse", "mse_repeat_last", "psnr", "psnr_repeat_last"} <= set(h1)
    assert set(m["fidelity"]["reward_end"]["reward"]["recall"]) == {"negative", "zero", "positive"}
    assert (resumed / "media" / "imagination.gif").read_bytes()[:3] == b"GIF"
    wm = load_world_model(resumed / "world_model.pt", torch.device("cpu"), params_from_dict(tiny_params_dict()).world_model)
    assert wm.denoiser_steps == 5 and wm.num_actions == num_actions(GAME)


@pytest.mark.slow
def test_killed_run_resumes_from_partial_checkpoint(tmp_path, dataset):
    out = tmp_path / "run"
    long = params_file(tmp_path / "long.yaml", 10_000, every=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "stages.train_world_model", *stage_args(long, out, dataset)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    partial = out / "world_model.pt.partial"
    deadline = time.time() + 240
    try:
        while not partial.exists():
            assert proc.poll() is None, f"stage exited early: {proc.stdout.read().decode()[-2000:]}"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = read_checkpoint(partial)
    k = killed["denoiser_trainer"]["num_steps"]
    assert 1 <= k < 10_000 and not (out / "world_model.pt").exists()
    # Rerun asking 2 more steps than were saved: it resumes from the partial checkpoint.
    run_in_process(params_file(tmp_path / "more.yaml", k + 2, every=1), out, dataset)
    done = read_checkpoint(out / "world_model.pt")
    assert done["denoiser_trainer"]["num_steps"] == k + 2 and adam_steps(done, "denoiser_trainer") == {k + 2}
    assert done["iteration"] == k + 2 and not partial.exists()


@pytest.mark.parametrize("prior_init", [True, False])
def test_reward_end_prior_init_sets_the_heads_from_the_dataset(tmp_path, dataset, prior_init):
    # No training step: the checkpoint holds R's initial heads.
    d = tiny_params_dict()
    d["world_model"].update(denoiser_steps=0, reward_end_steps=0, reward_end_prior_init=prior_init)
    d["evaluate"].update(fidelity_horizons=[1], gif_frames=2)
    run_in_process(write_params(tmp_path / "p.yaml", d), tmp_path / "run", dataset)
    state = read_checkpoint(tmp_path / "run" / "world_model.pt")["reward_end"]
    store = EpisodeStore(dataset)
    eps = [store[i] for i in range(len(store))]
    reward, end = class_counts(np.concatenate([e.rew for e in eps]), np.concatenate([e.terminated for e in eps]))
    assert reward.sum() == end.sum() == store.num_steps
    if prior_init:
        assert torch.allclose(state["head.2.bias"], torch.cat([log_priors(reward), log_priors(end)]))
    else:
        assert "head.2.bias" not in state  # the official head: no output bias


def test_bad_inputs_are_one_line_errors(tmp_path, dataset):
    p = params_file(tmp_path / "p.yaml", 2)
    with pytest.raises(ArtifactError, match="dataset not found"):
        run_in_process(p, tmp_path / "x", tmp_path / "missing")
    res = subprocess.run([sys.executable, "-m", "stages.train_world_model", *stage_args(p, tmp_path / "y", tmp_path / "missing")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1
    d = tiny_params_dict()
    d["env"]["obs_size"] = 64  # the dataset holds 32x32 frames
    with pytest.raises(ArtifactError, match="frames of 32x32, not env.obs_size=64"):
        run_in_process(write_params(tmp_path / "p64.yaml", d), tmp_path / "z", dataset)


def test_official_segment_placements_resume_exactly(tmp_path, dataset):
    """With the official placements on (docs/official-parity.md C3, C7, C8; D2's feedback too), 3 steps then 5 equal a
    straight 5-step run: their extra offset draws come from the saved segment stream."""
    from diamond.world_model import loop

    def run(out: Path, steps: int) -> tuple[dict, Path | None]:
        d = tiny_params_dict()
        d["world_model"]["denoiser"].update(segment_end="clipped", segment_frames="without_final",
                                            padded_target_feedback="estimate")
        d["world_model"]["reward_end"]["segment_window"] = "both_sides"
        d["world_model"].update(denoiser_steps=steps, reward_end_steps=steps, checkpoint_every_steps=2)
        c = params_from_dict(d).world_model
        store = EpisodeStore(dataset)
        r = loop.start_or_resume(c, GAME, 0, store, num_actions(GAME), 32, out, torch.device("cpu"))
        return read_checkpoint(loop.train(r).out), r.resumed_from

    run(tmp_path / "resumed" / "wm.pt", 3)
    (a, resumed_from), (b, _) = run(tmp_path / "resumed" / "wm.pt", 5), run(tmp_path / "straight" / "wm.pt", 5)
    assert resumed_from == tmp_path / "resumed" / "wm.pt"
    assert a["denoiser_trainer"]["num_steps"] == b["denoiser_trainer"]["num_steps"] == 5
    assert_same_weights(a, b)


def test_a_run_killed_between_two_curve_rows_resumes_to_the_same_curve(tmp_path, dataset):
    """Checkpoints every 3 iterations, a curve row every 2: the run dies at its row of iteration 4,
    after the checkpoint of iteration 3. The resumed run's row 4 is still the mean over steps 3
    and 4 (the checkpoint holds step 3's part of it), as in a run never killed."""
    from diamond.world_model import loop

    class Killed(Exception):
        pass

    def run(out: Path, kill_at_row: int | None = None) -> tuple[dict, list[dict]]:
        d = tiny_params_dict()
        d["world_model"].update(denoiser_steps=6, reward_end_steps=6, checkpoint_every_steps=3, log_every_steps=2)
        c = params_from_dict(d).world_model

        def on_row(row: dict) -> None:
            if row["iteration"] == kill_at_row:
                raise Killed

        r = loop.start_or_resume(c, GAME, 0, EpisodeStore(dataset), num_actions(GAME), 32, out, torch.device("cpu"), on_row)
        try:
            loop.train(r)
        except Killed:
            return read_checkpoint(loop.partial_path(out)), r.curve.rows
        return read_checkpoint(out), r.curve.rows

    killed, _ = run(tmp_path / "resumed" / "wm.pt", kill_at_row=4)
    assert killed["iteration"] == 3 and killed["curve_pending"]["counts"]["denoiser_loss"] == 1
    (a, rows_a), (b, rows_b) = run(tmp_path / "resumed" / "wm.pt"), run(tmp_path / "straight" / "wm.pt")
    assert [r["iteration"] for r in rows_a] == [2, 4, 6] and rows_a == rows_b
    assert_same_weights(a, b)
