"""Stage study-report: the world-model study's tables and figures (diamond/results/study_report.py) from
the error arrays of every variant and seed in `study.variants` x `study.seeds`.

    python -m stages.study_report --params params.yaml --game Breakout --jobs-dir study/Breakout --out reports/study

Outputs in --out: study_table.md, study_table.csv, study.json, study_error_vs_horizon.png,
study_frames.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from diamond.config import ConfigError, Params
from diamond.io import ArtifactError, atomic_write_bytes, atomic_write_json
from diamond.results.study_errors import load_errors
from diamond.results.study_report import BASELINE, plot_error_vs_horizon, plot_frame_strip, summarize, table_csv, table_markdown
from stages import tracking
from stages.common import base_parser, forget_provenance, load_checked_params, run_main, stage_sections
from stages.tracking import stage_run

ERRORS_FILE = "errors.npz"  # as stages.study writes it
OUTPUTS = ("study_table.md", "study_table.csv", "study.json", "study_error_vs_horizon.png", "study_frames.png")


def job_errors(jobs_dir: Path, p: Params) -> dict[tuple[str, int], dict[str, Any]]:
    out = {}
    for v in p.study.variants:
        for s in p.study.seeds:
            path = jobs_dir / f"{v.name}-{s}" / ERRORS_FILE
            if not path.is_file():
                raise ArtifactError(f"{path}: missing; run the study stage of variant {v.name!r}, seed {s} first")
            out[(v.name, s)] = load_errors(path)
    return out


def main() -> None:
    parser = base_parser("Tables and figures of the world-model study.", per_run=False)
    parser.add_argument("--game", required=True, help="the study's game (study.games)")
    parser.add_argument("--jobs-dir", required=True, type=Path, help="directory of the study jobs' outputs")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    p = load_checked_params(args)
    if args.game not in p.study.games:
        raise ConfigError(f"--game: {args.game!r} is not in study.games {p.study.games}")
    forget_provenance(args.out, "study-report")
    errors = job_errors(args.jobs_dir, p)
    with stage_run("study-report", sections=stage_sections(p, "study-report"), inputs=[args.jobs_dir], job_dir=args.out):
        tracking.set_tags({"game": args.game})
        results = summarize(p.study, errors)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out / "study_table.md", table_markdown(results).encode())
        atomic_write_bytes(args.out / "study_table.csv", table_csv(results).encode())
        atomic_write_json(args.out / "study.json", results)
        plot_error_vs_horizon(results, args.out / "study_error_vs_horizon.png")
        seed = p.study.seeds[0]
        plot_frame_strip({v.name: errors[(v.name, seed)] for v in p.study.variants}, args.out / "study_frames.png",
                         f"{args.game}: the longest held-out rollout, seed {seed}")
        for name in OUTPUTS:
            tracking.log_artifact(str(args.out / name))
        for name, row in results["rows"].items():
            for h, cell in row["horizons"].items():
                for k in ("mse", "psnr", "ssim"):
                    if cell[k] is not None:
                        tracking.log_metric(f"{'baseline' if name == BASELINE else name}/h{h}/{k}", cell[k]["mean"])
        print(f"study-report {args.game}: {len(p.study.variants)} variants x {len(p.study.seeds)} seeds -> {args.out}")


if __name__ == "__main__":
    run_main(main)
