"""benchmarks.bench at a tiny size: the figures it promises are there and add up."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks import bench
from diamond.config import load_params

TINY = ["--config", str(bench.ROOT / "params.yaml"), "--batch-size", "2", "--obs-size", "32", "--reps", "1",
        "--matmul-size", "256", "--threads", "1"]


def test_bench_profile_breakdown_adds_up(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--json", str(out), *TINY, "--profile"])
    r = json.loads(out.read_text())
    for key in ("denoiser_train_step_s", "sample_frames_per_s", "train_step_flops", "matmul_peak_gflops_fp32",
                "matmul_peak_gflops_bf16", "train_step_fraction_of_fp32_peak"):
        assert r[key] > 0, key
    # Convolutions are most of the U-Net's FLOPs, and their backward costs about twice the forward.
    conv = r["train_step_conv_forward_flops"] + r["train_step_conv_backward_flops"]
    assert 0.8 * r["train_step_flops"] < conv <= r["train_step_flops"]
    assert 1.5 < r["train_step_conv_backward_flops"] / r["train_step_conv_forward_flops"] < 2.5
    parts = r["profile_conv_forward_s"] + r["profile_conv_backward_s"] + r["profile_other_s"]
    assert parts == pytest.approx(r["profile_step_s"])
    assert min(r["profile_conv_forward_s"], r["profile_conv_backward_s"], r["profile_other_s"]) > 0
    assert 0 < r["profile_other_share"] < 1
    # The ceiling is the step's FLOPs over the profiled convolution time alone. It is checked against
    # the same profile, not against the unprofiled step: one profiled step runs with the profiler's
    # overhead, and on a shared machine the two timings can land either way.
    conv_s = r["profile_conv_forward_s"] + r["profile_conv_backward_s"]
    assert r["profile_conv_only_fraction_of_peak"] == pytest.approx(
        r["train_step_flops"] / conv_s / 1e9 / r["matmul_peak_gflops_fp32"])
    whole_profiled_step = r["train_step_flops"] / r["profile_step_s"] / 1e9 / r["matmul_peak_gflops_fp32"]
    assert r["profile_conv_only_fraction_of_peak"] > whole_profiled_step


def test_bench_run_projection_adds_up(tmp_path):
    """The R and actor-critic step times are there, and paper_run_hours is each model's steps of the
    config's schedule (counted here with diamond.agent.loop's own epoch count) times its step time."""
    from diamond.config import load_params
    from diamond.agent.loop import AgentRun

    out = tmp_path / "bench.json"
    bench.main(["--json", str(out), *TINY, "--bf16", "--channels-last"])
    r = json.loads(out.read_text())
    for key in ("reward_end_train_step_s", "actor_critic_train_step_s", "segment_batch_draw_s", "paper_run_hours",
                "paper_run_hours_denoiser", "paper_run_hours_reward_end", "paper_run_hours_actor_critic"):
        assert r[key] > 0, key
    p = load_params(bench.ROOT / "params.yaml")
    a = p.agent
    # A run whose initial collection stopped at collect.min_steps; the epoch counts read nothing else.
    loop_run = AgentRun(params=p, game="Pong", seed=0, device=torch.device("cpu"), store=None, world_model=None,
                        actor_critic=None, actor_critic_trainer=None, segment_rng=None, policy_rng=None,
                        initial_env_steps=p.collect.min_steps, env_steps=p.collect.min_steps)
    later = loop_run.collect_epochs + a.final_epochs_without_collection
    assert r["paper_run_epochs"] == loop_run.total_epochs == 1 + later
    steps = {
        "denoiser": p.world_model.denoiser_steps + later * a.denoiser_steps_per_epoch,
        "reward_end": p.world_model.reward_end_steps + later * a.reward_end_steps_per_epoch,
        "actor_critic": a.first_epoch_actor_critic_steps + later * a.actor_critic_steps_per_epoch,
    }
    # With --bf16 the headline (bf16) denoiser step is the one the projection uses.
    step_s = {"denoiser": r["denoiser_train_step_s_bf16"], "reward_end": r["reward_end_train_step_s"],
              "actor_critic": r["actor_critic_train_step_s"]}
    for part in steps:
        assert r[f"paper_run_{part}_steps"] == steps[part], part
        assert r[f"paper_run_hours_{part}"] == pytest.approx(steps[part] * step_s[part] / 3600), part
    assert r["paper_run_hours"] == pytest.approx(sum(steps[k] * step_s[k] for k in steps) / 3600)
    assert "environment stepping" in r["paper_run_hours_excludes"] and "evaluation" in r["paper_run_hours_excludes"]


def test_bench_imports_no_emulator_or_tracking():
    """The GPU machine has only torch, numpy and yaml: importing benchmarks.bench and loading the
    params with the normal loader must not pull in more."""
    code = ("import sys, benchmarks.bench; from diamond.config import load_params; load_params('configs/paper.yaml'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'gymnasium', 'ale_py', 'cv2', 'mlflow', 'dvc'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=bench.ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_bench_reuse_freed_memory_times_the_step_both_ways(tmp_path):
    """--reuse-freed-memory times the fp32 step before and after keeping freed memory (in a child
    process: the allocator setting is process-wide)."""
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "benchmarks.bench", "--json", str(out), *TINY, "--reuse-freed-memory"],
                   cwd=bench.ROOT, capture_output=True, text=True, check=True)
    r = json.loads(out.read_text())
    assert r["reuse_freed_memory"] is True
    assert r["denoiser_train_step_s_fp32_allocator_as_found"] > 0
    assert r["reuse_freed_memory_train_step_speedup"] == pytest.approx(
        r["denoiser_train_step_s_fp32_allocator_as_found"] / r["denoiser_train_step_s_fp32"])
    assert r["reuse_freed_memory_reward_end_step_speedup"] == pytest.approx(
        r["reward_end_train_step_s_fp32_allocator_as_found"] / r["reward_end_train_step_s"])


def test_official_side_by_side_reads_the_official_configs_interpolations():
    """The official configs' two interpolations (a reference, an eval over references) and their
    YAML 1.1 floats resolve without omegaconf; an unknown form is a one-line error."""
    from benchmarks.official_side_by_side import resolve

    tree = {"a": {"size": 64, "lr": "1e-4"}, "b": {"n": 4}, "c": {"h": 15}}
    node = {"_target_": "x.Y", "size": "${a.size}", "lr": "${a.lr}",
            "seq": "${eval:'${c.h} + ${b.n}'}", "top": "${eval:'float(\"inf\")'}"}
    assert resolve(tree, node) == {"size": 64, "lr": 1e-4, "seq": 19, "top": float("inf")}
    with pytest.raises(SystemExit, match="cannot resolve"):
        resolve(tree, "${oc.env:HOME}")


def test_official_side_by_side_stubs_only_missing_packages():
    """Packages the official code imports but the timed paths never use are stubbed only when
    missing: a stub's attributes are classes that can be subclassed, its submodules import."""
    code = ("import sys\nfrom benchmarks.official_side_by_side import _StubFinder\n"
            "sys.meta_path.insert(0, _StubFinder({'nosuchpkg'}))\n"
            "import nosuchpkg\nfrom nosuchpkg.core import Thing\n"
            "class X(nosuchpkg.Wrapper, nosuchpkg.utils.Mixin): pass\n"
            "import json\nprint(json.__name__, Thing.__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=bench.ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["json", "Thing"]


def test_bf16_actor_critic_compares_three_runs(tmp_path):
    """benchmarks.bf16_actor_critic at the tiny default config, 3 steps: every metric of the three
    runs, the differences and the verdict are there."""
    from benchmarks import bf16_actor_critic

    out = tmp_path / "bf16.json"
    bf16_actor_critic.main(["--params", str(bench.ROOT / "params.yaml"), "--steps", "3", "--tail", "2", "--json", str(out)])
    r = json.loads(out.read_text())
    for m in bf16_actor_critic.METRICS:
        for run in ("fp32_seed0", "bf16_seed0", "fp32_seed1"):
            assert isinstance(r[f"{m}_{run}"], float), (m, run)
        assert r[f"{m}_bf16_minus_fp32"] == pytest.approx(r[f"{m}_bf16_seed0"] - r[f"{m}_fp32_seed0"])
        assert isinstance(r[f"{m}_bf16_within_noise"], bool)
    assert r["loss_value_fp32_seed0"] != r["loss_value_fp32_seed1"]  # the seed changes the run


def test_denoiser_draws_trains_and_measures_a_draw_and_a_checkpoint(tmp_path):
    """benchmarks.denoiser_draws: D alone from one training draw on a real Breakout store, its
    per-step fidelity against repeat-last; the same draw twice gives the same figures (the draw
    is all the randomness), another autoregressive setting other ones, and `--checkpoint`
    measures a saved world model's D on the same rollouts."""
    from benchmarks import denoiser_draws
    from diamond.env.collector import Collector, UniformPolicy
    from diamond.data import EpisodeStore
    from diamond.env.atari import make_env, num_actions
    from diamond.world_model.model import build_world_model, save_world_model
    from tests.conftest import tiny_params_dict, write_params

    d = tiny_params_dict()
    d["compile_denoiser"] = False
    params = write_params(tmp_path / "params.yaml", d)
    p = load_params(params)
    store = EpisodeStore(tmp_path / "store", "Breakout", num_actions("Breakout"))
    collector = Collector(make_env("Breakout", 0, train=True, config=p.env),
                          UniformPolicy(num_actions("Breakout"), np.random.default_rng(0)), store)
    collector.collect(120)
    collector.flush()
    common = ["--params", str(params), "--dataset", str(store.root), "--steps", "3", "--heldout", "1", "--rollouts", "2"]
    runs = {}
    for name, extra in (("a", ["--autoregressive-steps", "1"]), ("b", ["--autoregressive-steps", "1"]),
                        ("c", ["--autoregressive-steps", "0"])):
        denoiser_draws.main(common + extra + ["--json", str(tmp_path / f"{name}.json")])
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert len(a["mse"]) == len(a["mse_repeat_last"]) == denoiser_draws.HORIZON
    assert a["num_rollouts"] == 2 and a["autoregressive_steps"] == 1 and c["autoregressive_steps"] == 0
    assert a["mse"] == b["mse"] and a["final_loss"] == b["final_loss"]
    assert a["mse"] != c["mse"]
    assert a["mse_repeat_last"] == c["mse_repeat_last"]  # the same held-out rollouts
    assert a["ratio_h1"] == pytest.approx(a["mse"][0] / a["mse_repeat_last"][0])
    wm = build_world_model(p.world_model, num_actions("Breakout"), p.env.obs_size, torch.device("cpu"))
    save_world_model(tmp_path / "world_model.pt", wm)
    denoiser_draws.main(common + ["--checkpoint", str(tmp_path / "world_model.pt"), "--json", str(tmp_path / "ckpt.json")])
    ckpt = json.loads((tmp_path / "ckpt.json").read_text())
    assert ckpt["mse_repeat_last"] == a["mse_repeat_last"] and ckpt["mse"] != a["mse"]


@pytest.mark.slow  # ~30 s: the whole gpu_check.sh script, its benchmarks as subprocesses
def test_gpu_check_dry_run_writes_the_report(tmp_path):
    """benchmarks/gpu_check.sh --dry-run (CPU, tiny config, ours only): one report in
    reports/bench/<gpu>_<date>.json with every figure of issue 28 finite, the packed K = 1, 2
    workers' throughput and memory, and the two projections as benchmarks/gpu_report.py defines them."""
    import os

    env = {**os.environ, "PYTHON": sys.executable, "OFFICIAL": ""}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(tmp_path)], cwd=bench.ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    reports = list((tmp_path / "reports" / "bench").glob("cpu-dry-run_*.json"))
    assert len(reports) == 1, done.stdout[-3000:]
    assert reports[0].with_suffix(".log").exists()
    r = json.loads(reports[0].read_text())
    for key in ("ours_actor_critic_step_s_eager", "ours_actor_critic_step_s_compiled", "denoiser_step_s",
                "reward_end_step_s", "paper_run_hours", "table1_gpu_hours", "best_k_speedup"):
        assert isinstance(r[key], float) and np.isfinite(r[key]) and r[key] > 0, key
    assert r["official_actor_critic_step_s"] is None  # no official checkout in a dry run
    assert set(r["packed"]) == {"1", "2"}
    for k, packed in r["packed"].items():
        assert packed["error"] is None
        for key in ("actor_critic_steps_per_s", "imagined_steps_per_s", "imagined_frames_per_s"):
            assert np.isfinite(packed[key]) and packed[key] > 0, (k, key)
        assert packed["imagined_steps_per_s"] == pytest.approx(2 * packed["actor_critic_steps_per_s"])  # horizon 2
        assert len(packed["peak_memory_mb"]) == int(k) and min(packed["peak_memory_mb"]) > 0
    ac = min(r["ours_actor_critic_step_s_eager"], r["ours_actor_critic_step_s_compiled"])
    assert r["paper_run_hours_actor_critic"] == pytest.approx(r["paper_run_actor_critic_steps"] * ac / 3600)
    assert r["paper_run_hours"] == pytest.approx(r["paper_run_hours_denoiser"] + r["paper_run_hours_reward_end"]
                                                 + r["paper_run_hours_actor_critic"])
    assert r["table1_gpu_hours"] == pytest.approx(130 * r["paper_run_hours"] / r["best_k_speedup"])
    assert r["best_k_speedup"] == max(p["speedup_over_one"] for p in r["packed"].values())


def test_gpu_report_names_the_gpu_and_tolerates_missing_parts(tmp_path):
    """A part stopped by its timeout before writing leaves its figures null, not a crash."""
    from benchmarks.gpu_report import gpu_slug, main

    assert gpu_slug("NVIDIA H200") == "h200" and gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    path = main(["--out", str(tmp_path), "--gpu", "NVIDIA H100 80GB HBM3", "--date", "2026-12-06",
                 "--side-by-side", str(tmp_path / "missing.json")])
    assert path == tmp_path / "reports" / "bench" / "h100_2026-12-06.json"
    r = json.loads(path.read_text())
    assert r["paper_run_hours"] is None and r["table1_gpu_hours"] is None and r["packed"] == {}
