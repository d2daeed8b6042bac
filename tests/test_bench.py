"""diamond.bench at a tiny size: the figures it promises are there and add up."""

from __future__ import annotations

import json

import pytest

from diamond import bench


def test_bench_profile_breakdown_adds_up(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--json", str(out), "--config", str(bench.ROOT / "params.yaml"), "--batch-size", "2",
                "--obs-size", "32", "--reps", "1", "--matmul-size", "256", "--threads", "1", "--profile"])
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
    # Without the rest of the step, the convolutions alone would reach a higher fraction of peak.
    assert r["profile_conv_only_fraction_of_peak"] > r["train_step_fraction_of_fp32_peak"]
