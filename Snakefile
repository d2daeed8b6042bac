# The DIAMOND Atari 100k pipeline for Snakemake: the same DAG and the same stage commands as
# dvc.yaml, over the games x seeds of a params file.
#
#   snakemake -j 2                                        # params.yaml, local (profiles/default)
#   snakemake -n --config params=configs/paper.yaml       # dry run of the paper's 26 x 5 runs
#   snakemake --profile profiles/slurm --config params=configs/paper.yaml    # on a SLURM cluster
#   snakemake -j 16 --resources gpu_share=2 ...           # 2 GPU jobs on one GPU (params runs_per_gpu: 2)
#
# What runs is decided from file contents alone, never from file times, so that results restored
# by `dvc pull`/`dvc checkout` or copied stay current (stages/provenance.py): every
# job writes a provenance record (an output here and in dvc.yaml, so it travels with the other
# outputs); every input is `ancient` unless the job that makes it runs (`made_by`); a job whose
# outputs are on disk but not current (another key, no record, a file that differs from its
# record, a job before it that runs) takes a stale marker as an input, written when this file is
# read, dated now (after every output: none is left dated in the future), and saying why (printed as
# `provenance: rerun ...`).
# profiles/default sets the rerun triggers to `software-env` alone, so Snakemake's own records
# of earlier runs (.snakemake/metadata, which do not travel) decide nothing either.

import os
import re
import shlex
import sys
import time
import uuid

sys.path.insert(0, workflow.basedir)
from stages import layout, provenance  # noqa: E402  (standard library and PyYAML only)

PARAMS_FILE = config.get("params", "params.yaml")
P = layout.load_raw(PARAMS_FILE)
RUNS = layout.runs(P)
PY = shlex.quote(sys.executable)
ON_GPU = P["device"] != "cpu"

# One id for every MLflow run of this invocation (tag pipeline_id). Cluster jobs re-read this
# file but inherit the variable from the submitting process, so they keep the same id.
os.environ.setdefault(
    "DIAMOND_PIPELINE_ID", f"snakemake-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
)

wildcard_constraints:
    game="[A-Za-z]+",
    seed="[0-9]+",

RUN = "runs/{game}-{seed}"
ARGS = "--params {PARAMS_FILE} --game {wildcards.game} --seed {wildcards.seed}"


# The plan (job -> why it must run) and, for every job in it whose outputs are on disk, a stale
# marker (path -> reason). Only the main process plans: a cluster job re-reads this file to run
# the one job it was given. Markers are named after this invocation, so that one left by an
# interrupted run is not taken for this run's (`stages.pipeline done` removes a job's markers).
PLAN = provenance.plan(P) if workflow.is_main_process else {}
MARKER_TAG = re.sub(r"[^A-Za-z0-9_.-]", "_", os.environ["DIAMOND_PIPELINE_ID"])
STALE = provenance.stale_markers(P, PLAN, MARKER_TAG)
for _reason in STALE.values():
    print(f"provenance: rerun {_reason}", file=sys.stderr)


def made_by(path, stage, game=None, seed=None):
    """An input made by the job (stage, game, seed): `ancient`, so that its date counts for
    nothing, unless the plan runs that job; then Snakemake must see the input as new, so that
    the job reading it runs after it (it skips a job reading only ancient inputs, although the
    plan, which follows every job after one that runs, has it too)."""
    return path if (stage, game, seed) in PLAN else ancient(path)


def stale(stage, game=None, seed=None):
    """A job's stale marker as an input when the plan reruns it, else nothing."""
    marker = provenance.stale_marker_path(stage, game, seed, MARKER_TAG)
    return [marker] if marker in STALE else []


def record(job_dir, stage):
    """The job's provenance record as a rule output (job_dir may hold the rule's wildcards)."""
    return f"{job_dir}/{layout.PROVENANCE_DIR}/{stage}.json"


RUNS_PER_GPU = P["runs_per_gpu"]


def res(cpu_threads, gpu_threads, mem_mb, runtime_min, gpu=False):
    """Resources of a rule. Runtimes and memory are for the paper's scale on one GPU (the
    paper reports ~2.9 days per run on an RTX 4090); the small default needs far less.

    A GPU job asks for one `gpu_share`, a count that only limits how many run at once
    (`snakemake --resources gpu_share=K`: K GPU jobs on the machine's GPU; Snakemake docs,
    "Resources"), and on SLURM for a whole GPU (`gpu=1`: the executor plugin's `--gpus=1`) or,
    with params `runs_per_gpu` K > 1, for one GPU shard (`gres=shard:1`: `--gres=shard:1`,
    https://slurm.schedmd.com/gres.html#Sharding), so that K jobs share a GPU. Each then caps
    its CUDA memory at 1/K (diamond/allocator.py `cap_gpu_memory`)."""
    on_gpu = gpu and ON_GPU
    shared = on_gpu and RUNS_PER_GPU > 1
    return {
        "threads": gpu_threads if ON_GPU else cpu_threads,
        "mem_mb": mem_mb,
        "runtime": runtime_min,
        "gpu": 1 if on_gpu and not shared else 0,
        "gpu_share": 1 if on_gpu else 0,
        **({"gres": "shard:1"} if shared else {}),
    }


R = {
    "collect": res(1, 2, 8_000, 120),
    "train_world_model": res(1, 8, 32_000, 24 * 60, gpu=True),
    "train_agent": res(1, 8, 64_000, 4 * 24 * 60, gpu=True),
    "evaluate": res(1, 4, 16_000, 12 * 60, gpu=True),
    "aggregate": res(1, 1, 4_000, 60),
    "import_released": res(1, 1, 8_000, 30),
    "study": res(1, 8, 32_000, 24 * 60, gpu=True),
    "study_report": res(1, 1, 4_000, 30),
}


def rule_resources(rule):
    """A rule's `resources:` (R without its threads)."""
    return {k: v for k, v in R[rule].items() if k != "threads"}


rule all:
    input:
        "reports/atari100k_table.md",



rule collect:
    input:
        stale=lambda w: stale("collect", w.game, int(w.seed)),
    output:
        dataset=directory(RUN + "/dataset_initial"),
        stats=RUN + "/collect.json",
        provenance=record(RUN, "collect"),
    log:
        "logs/collect/{game}-{seed}.log",
    threads: R["collect"]["threads"]
    resources:
        **rule_resources("collect"),
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m stages.collect " + ARGS + " "
        "--out-dataset {output.dataset} --out-stats {output.stats} > {log} 2>&1"
        " && {PY} -m stages.pipeline done --params {PARAMS_FILE} --stage collect --game {wildcards.game} --seed {wildcards.seed} --tool snakemake"


rule train_world_model:
    input:
        dataset=lambda w: made_by(layout.run_dir(w.game, int(w.seed)) + "/dataset_initial", "collect", w.game, int(w.seed)),
        stale=lambda w: stale("train-world-model", w.game, int(w.seed)),
    output:
        checkpoint=RUN + "/world_model.pt",
        metrics=RUN + "/world_model.json",
        curve=RUN + "/world_model_curve.csv",
        media=directory(RUN + "/world_model_media"),
        provenance=record(RUN, "train-world-model"),
    log:
        "logs/train_world_model/{game}-{seed}.log",
    threads: R["train_world_model"]["threads"]
    resources:
        **rule_resources("train_world_model"),
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m stages.train_world_model " + ARGS + " "
        "--dataset {input.dataset} --out-checkpoint {output.checkpoint} "
        "--out-metrics {output.metrics} --out-curve {output.curve} --out-media {output.media} "
        "> {log} 2>&1"
        " && {PY} -m stages.pipeline done --params {PARAMS_FILE} --stage train-world-model --game {wildcards.game} --seed {wildcards.seed} --tool snakemake"


rule train_agent:
    input:
        dataset=lambda w: made_by(layout.run_dir(w.game, int(w.seed)) + "/dataset_initial", "collect", w.game, int(w.seed)),
        world_model=lambda w: made_by(layout.run_dir(w.game, int(w.seed)) + "/world_model.pt", "train-world-model", w.game, int(w.seed)),
        stale=lambda w: stale("train-agent", w.game, int(w.seed)),
    output:
        checkpoint=RUN + "/agent.pt",
        dataset=directory(RUN + "/dataset"),
        metrics=RUN + "/agent.json",
        curve=RUN + "/agent_curve.csv",
        provenance=record(RUN, "train-agent"),
    params:
        # resume scratch, not an output: a job killed at the time limit resumes when rerun
        state_dir=RUN + "/agent_state",
    log:
        "logs/train_agent/{game}-{seed}.log",
    threads: R["train_agent"]["threads"]
    resources:
        **rule_resources("train_agent"),
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m stages.train_agent " + ARGS + " "
        "--dataset {input.dataset} --world-model {input.world_model} "
        "--out-checkpoint {output.checkpoint} --out-dataset {output.dataset} "
        "--out-metrics {output.metrics} --out-curve {output.curve} --state-dir {params.state_dir} "
        "> {log} 2>&1"
        " && {PY} -m stages.pipeline done --params {PARAMS_FILE} --stage train-agent --game {wildcards.game} --seed {wildcards.seed} --tool snakemake"


rule evaluate:
    input:
        agent=lambda w: made_by(layout.run_dir(w.game, int(w.seed)) + "/agent.pt", "train-agent", w.game, int(w.seed)),
        dataset=lambda w: made_by(layout.run_dir(w.game, int(w.seed)) + "/dataset", "train-agent", w.game, int(w.seed)),
        stale=lambda w: stale("evaluate", w.game, int(w.seed)),
    output:
        score=RUN + "/score.json",
        fidelity=RUN + "/evaluate_fidelity.json",
        media=directory(RUN + "/evaluate_media"),
        provenance=record(RUN, "evaluate"),
    log:
        "logs/evaluate/{game}-{seed}.log",
    threads: R["evaluate"]["threads"]
    resources:
        **rule_resources("evaluate"),
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m stages.evaluate " + ARGS + " "
        "--agent {input.agent} --dataset {input.dataset} --out-score {output.score} "
        "--out-fidelity {output.fidelity} --out-media {output.media} > {log} 2>&1"
        " && {PY} -m stages.pipeline done --params {PARAMS_FILE} --stage evaluate --game {wildcards.game} --seed {wildcards.seed} --tool snakemake"


# The authors' released agents, per game of `released.games` (diamond/official/released.py): import the
# official checkpoint, then the evaluate stage's own code. Their runs live in runs/released/G.
RELEASED = "runs/released/{game}"


rule import_released:
    input:
        stale=lambda w: stale("import-released", w.game),
    output:
        world_model=RELEASED + "/world_model.pt",
        agent=RELEASED + "/agent.pt",
        source=RELEASED + "/source.json",
        provenance=record(RELEASED, "import-released"),
    log:
        "logs/import_released/{game}.log",
    threads: R["import_released"]["threads"]
    resources:
        **rule_resources("import_released"),
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m stages.import_released --params {PARAMS_FILE} --game {wildcards.game} "
        "--out-world-model {output.world_model} --out-agent {output.agent} --out-source {output.source} > {log} 2>&1"
        " && {PY} -m stages.pipeline done --params {PARAMS_FILE} --stage import-released --game {wildcards.game} --tool snakemake"


rule evaluate_released:
    input:
        agent=lambda w: made_by(layout.released_dir(w.game) + "/agent.pt", "import-released", w.game),
        stale=lambda w: stale("evaluate-released", w.game),
    output:
        score=RELEASED + "/score.json",
        fidelity=RELEASED + "/evaluate_fidelity.json",
        media=directory(RELEASED + "/evaluate_media"),
        provenance=record(RELEASED, "evaluate-released"),
    params:
        seed=P["released"]["seed"],
    log:
        "logs/evaluate_released/{game}.log",
    threads: R["evaluate"]["threads"]
    resources:
        **rule_resources("evaluate"),
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m stages.evaluate --params {PARAMS_FILE} --game {wildcards.game} "
        "--seed {params.seed} --released --agent {input.agent} --out-score {output.score} "
        "--out-fidelity {output.fidelity} --out-media {output.media} > {log} 2>&1"
        " && {PY} -m stages.pipeline done --params {PARAMS_FILE} --stage evaluate-released --game {wildcards.game} --tool snakemake"


rule aggregate:
    input:
        scores=[made_by(path, *job) for path, job in layout.score_jobs(P)],
        stale=stale("aggregate"),
    output:
        table="reports/atari100k_table.md",
        csv="reports/atari100k_table.csv",
        tex="reports/atari100k_table.tex",
        json="reports/atari100k_aggregate.json",
        released="reports/released_vs_paper.md",
        provenance=record(layout.REPORTS_DIR, "aggregate"),
    log:
        "logs/aggregate.log",
    threads: R["aggregate"]["threads"]
    resources:
        **rule_resources("aggregate"),
    shell:
        "{PY} -m stages.aggregate --params {PARAMS_FILE} --results {input.scores} --out reports "
        "> {log} 2>&1"
        " && {PY} -m stages.pipeline done --params {PARAMS_FILE} --stage aggregate --tool snakemake"


# The world-model study (paper section 5.1; params `study`, diamond/world_model/study.py), its own product:
# not part of `all`. `snakemake -j 2 study` trains and rolls out every variant x seed of
# study.variants x study.seeds on the static store study.dataset, then writes reports/study/.
# Study jobs live in study/{game}/{variant}-{seed}; the variant's definition reaches the stage
# command (and its provenance key) from the params file.
STUDY = P["study"]
STUDY_JOB = "study/{game}/{variant}-{seed}"
STUDY_GAMES = layout.study_games(P)


def study_variant(name):
    return layout.study_variant(P, name)[1]


rule study:
    input:
        [f"{layout.STUDY_REPORTS_DIR}/study_table.md" for _ in STUDY_GAMES],


rule study_variant:
    input:
        dataset=made_by(STUDY["dataset"], *(layout.dataset_producer(P) or [(None, None, None)])[0]),
        stale=lambda w: stale("study", layout.study_job(w.game, w.variant), int(w.seed)),
    output:
        checkpoint=STUDY_JOB + "/denoiser.pt",
        errors=STUDY_JOB + "/errors.npz",
        metrics=STUDY_JOB + "/metrics.json",
        provenance=record(STUDY_JOB, "study"),
    wildcard_constraints:
        variant="[A-Za-z][A-Za-z0-9_-]*",
    params:
        formulation=lambda w: study_variant(w.variant)["formulation"],
        num_steps=lambda w: study_variant(w.variant)["num_steps"],
        out_dir=lambda w: layout.study_job_dir(w.game, w.variant, int(w.seed)),
    log:
        "logs/study/{game}-{variant}-{seed}.log",
    threads: R["study"]["threads"]
    resources:
        **rule_resources("study"),
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m stages.study " + ARGS + " --variant {wildcards.variant} "
        "--formulation {params.formulation} --num-steps {params.num_steps} --out-dir {params.out_dir} > {log} 2>&1"
        " && {PY} -m stages.pipeline done --params {PARAMS_FILE} --stage study --game {wildcards.game} --variant {wildcards.variant} --seed {wildcards.seed} --tool snakemake"


rule study_report:
    input:
        # evaluated only when the report is asked for, so only when study.games names a game
        errors=lambda w: [made_by(layout.study_job_dir(g, v, s) + "/errors.npz", "study", layout.study_job(g, v), s)
                          for g, v, s in layout.study_jobs(P)],
        stale=lambda w: stale("study-report", STUDY_GAMES[0]),
    output:
        table=layout.STUDY_REPORTS_DIR + "/study_table.md",
        csv=layout.STUDY_REPORTS_DIR + "/study_table.csv",
        json=layout.STUDY_REPORTS_DIR + "/study.json",
        curve=layout.STUDY_REPORTS_DIR + "/study_error_vs_horizon.png",
        frames=layout.STUDY_REPORTS_DIR + "/study_frames.png",
        provenance=record(layout.STUDY_REPORTS_DIR, "study-report"),
    params:
        game=lambda w: STUDY_GAMES[0],
    log:
        "logs/study_report.log",
    threads: R["study_report"]["threads"]
    resources:
        **rule_resources("study_report"),
    shell:
        "{PY} -m stages.study_report --params {PARAMS_FILE} --game {params.game} --jobs-dir study/{params.game} "
        "--out " + layout.STUDY_REPORTS_DIR + " > {log} 2>&1"
        " && {PY} -m stages.pipeline done --params {PARAMS_FILE} --stage study-report --game {params.game} --tool snakemake"
