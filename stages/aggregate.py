"""Stage `aggregate`: this pipeline's score files beside the published Atari 100k baselines.

    python -m stages.aggregate --params params.yaml --results runs/*/score.json --out reports
    python -m stages.aggregate --reference-only --out reports/reference

Writes atari100k_table.{md,csv,tex}, atari100k_aggregate.json and the figures under --out, and
logs them to one MLflow run (stage "aggregate") with the aggregates as metrics. Score files of
the authors' released agents (method `released.method_name`) are one more row, and
released_vs_paper.{md,png} compares them with the paper's per-seed scores game by game.
"""

from __future__ import annotations

import re
from pathlib import Path


from diamond.config import ConfigError
from diamond.results.released_report import PAPER_METHOD, write_comparison
from diamond.results.report import Report, build_report, write_report
from diamond.results.scores import load_method, load_results, results_by_method
from stages import tracking
from stages.common import base_parser, forget_provenance, load_checked_params, run_main, stage_sections
from stages.tracking import stage_run


def parse_args(argv: list[str] | None = None):
    p = base_parser("Atari 100k score tables and figures beside the published baselines", per_run=False)
    p.add_argument("--results", nargs="*", default=[], type=Path, help="score.json files written by stages.evaluate")
    p.add_argument("--reference-only", action="store_true", help="tables from the published scores alone")
    p.add_argument("--out", default=Path("reports"), type=Path, help="output folder (default: reports)")
    return p.parse_args(argv)


def metric_name(*parts: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / : and spaces only.
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. :]", "_", p) for p in parts)


def log_metrics(report: Report) -> None:
    metrics = {}
    for name, agg in report.aggregates.items():
        for key, est in agg.estimates.items():
            metrics[metric_name(name, key)] = est.value
            metrics[metric_name(name, key + "_ci_low")] = est.lo
            metrics[metric_name(name, key + "_ci_high")] = est.hi
        metrics[metric_name(name, "superhuman")] = agg.superhuman
        metrics[metric_name(name, "games")] = len(agg.games)
    for imp in report.improvements:
        metrics[metric_name("probability_of_improvement", f"{imp.subject} over {imp.baseline}")] = imp.estimate.value
    tracking.log_metrics(metrics)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.reference_only and args.results:
        raise ConfigError("--reference-only takes no --results; drop one of them")
    if not args.reference_only and not args.results:
        raise ConfigError("--results: no score files given; pass runs/*/score.json or use --reference-only")
    params = load_checked_params(args)
    cfg = params.aggregate
    forget_provenance(args.out, "aggregate")
    if args.reference_only and not cfg.reference_methods:
        raise ConfigError("aggregate.reference_methods is empty: --reference-only has nothing to show")
    results = load_results(args.results)  # every file checked before any work
    runs = results_by_method(results)
    reference = [load_method(m) for m in cfg.reference_methods]
    with stage_run("aggregate", sections=stage_sections(params, "aggregate"), inputs=list(args.results), job_dir=args.out):
        tracking.set_tags({"reference_only": str(args.reference_only), "run_methods": ", ".join(m.name for m in runs)})
        report = build_report(reference, runs, cfg.bootstrap_reps, cfg.confidence, cfg.bootstrap_seed)
        written = write_report(report, args.out)
        if not args.reference_only:
            written += write_comparison(results, load_method(PAPER_METHOD), report, params.released.method_name,
                                        args.out, cfg.confidence, cfg.bootstrap_seed)
        log_metrics(report)
        for path in written:
            tracking.log_artifact(str(path), artifact_path="reports")
    print(f"aggregate: wrote {len(written)} files to {args.out}")


if __name__ == "__main__":
    run_main(main)
