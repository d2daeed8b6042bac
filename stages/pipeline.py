"""The command line the pipeline tools call between stages (stages/layout.py: what they share;
stages/provenance.py: the record each job leaves and the plan of what must run).

Command line, used by dvc.yaml (DVC templating has no cartesian product) and the Snakefile:

    python -m stages.pipeline score-files --params params.yaml   # runs/G-S/score.json ...
    python -m stages.pipeline done --params params.yaml --stage evaluate --game G --seed S --tool dvc
    python -m stages.pipeline done --params params.yaml --stage study --game G --variant V --seed S --tool dvc
    python -m stages.pipeline stale --params params.yaml         # the jobs that must run, and why

It imports only the standard library and PyYAML: the Snakefile loads it on every invocation.
"""

from __future__ import annotations

import argparse

from stages.layout import DVC_PARAMS_FILE, STAGE_MODULES, dvc_stage_name, load_raw, score_files, stage_code_files, study_job
from stages.provenance import plan, record_done


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sf = sub.add_parser("score-files", help="the score.json of every run in the params file")
    sf.add_argument("--params", default="params.yaml")
    cf = sub.add_parser("code-files", help="the source files a stage runs")
    cf.add_argument("stage", choices=sorted(STAGE_MODULES))
    dn = sub.add_parser("done", help="record a job's provenance after its stage command succeeded")
    dn.add_argument("--params", default=DVC_PARAMS_FILE)
    dn.add_argument("--stage", required=True, choices=sorted(STAGE_MODULES))
    dn.add_argument("--game")
    dn.add_argument("--seed", type=int)
    dn.add_argument("--variant", help="study jobs: the variant's name")
    dn.add_argument("--tool", required=True, choices=["dvc", "snakemake", "manual"])
    st = sub.add_parser("stale", help="the jobs that must run, with why (the plan both tools follow)")
    st.add_argument("--params", default=DVC_PARAMS_FILE)
    args = p.parse_args(argv)
    if args.command == "score-files":
        print(" ".join(score_files(load_raw(args.params))))
    elif args.command == "code-files":
        print("\n".join(stage_code_files(args.stage)))
    elif args.command == "done":
        game = study_job(args.game, args.variant) if args.stage == "study" else args.game
        record_done(args.params, args.stage, game, args.seed, args.tool)
    else:
        params = load_raw(args.params)
        for job, why in plan(params).items():
            print(f"{dvc_stage_name(*job, params)}: {why}")


if __name__ == "__main__":
    main()
