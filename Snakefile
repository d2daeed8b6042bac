# The DIAMOND Atari 100k pipeline for Snakemake: the same DAG and the same stage commands as
# dvc.yaml, over the games x seeds of a params file.
#
#   snakemake -j 2                                        # params.yaml, local (profiles/default)
#   snakemake -n --config params=configs/paper.yaml       # dry run of the paper's 26 x 5 runs
#   snakemake --profile profiles/slurm --config params=configs/paper.yaml    # on a SLURM cluster
#   snakemake -j 16 --resources gpu_share=2 ...           # 2 GPU jobs on one GPU (params runs_per_gpu: 2)
#
# Rerun rules (profiles/default/config.yaml): `--rerun-triggers code params input
# software-env`, without `mtime`, because DVC does not keep file timestamps on checkout. So that
# editing a params key or a source file still reruns exactly the stages that read it, each
# rule's `params` carries a digest of the params keys and of the source files the stage reads
# (the same lists that dvc.yaml declares, from stages/pipeline.py). Outputs that Snakemake has
# no record of (built by DVC, by hand, or under another params file) are judged by their
# provenance records (stages/pipeline.py, "Provenance"): every job takes its provenance key
# file as an input, which is dated now, and so reruns the job with all that follows, exactly
# when the job's outputs came from other params or code.

import os
import shlex
import sys
import time
import uuid

sys.path.insert(0, workflow.basedir)
from stages import pipeline  # noqa: E402  (standard library and PyYAML only)

PARAMS_FILE = config.get("params", "params.yaml")
P = pipeline.load_raw(PARAMS_FILE)
RUNS = pipeline.runs(P)
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


def rerun_digests(stage):
    """Rule params: a change in what the stage reads reruns it (`--rerun-triggers params`)."""
    return {"config": pipeline.params_digest(P, stage), "code": pipeline.code_digest(stage)}


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
        provenance=lambda w: pipeline.key_file(P, "collect", w.game, int(w.seed)),
    output:
        dataset=directory(RUN + "/dataset_initial"),
        stats=RUN + "/collect.json",
    params:
        **rerun_digests("collect"),
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
        dataset=RUN + "/dataset_initial",
        provenance=lambda w: pipeline.key_file(P, "train-world-model", w.game, int(w.seed)),
    output:
        checkpoint=RUN + "/world_model.pt",
        metrics=RUN + "/world_model.json",
        curve=RUN + "/world_model_curve.csv",
        media=directory(RUN + "/world_model_media"),
    params:
        **rerun_digests("train-world-model"),
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
        dataset=RUN + "/dataset_initial",
        world_model=RUN + "/world_model.pt",
        provenance=lambda w: pipeline.key_file(P, "train-agent", w.game, int(w.seed)),
    output:
        checkpoint=RUN + "/agent.pt",
        dataset=directory(RUN + "/dataset"),
        metrics=RUN + "/agent.json",
        curve=RUN + "/agent_curve.csv",
    params:
        # resume scratch, not an output: a job killed at the time limit resumes when rerun
        state_dir=RUN + "/agent_state",
        **rerun_digests("train-agent"),
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
        agent=RUN + "/agent.pt",
        dataset=RUN + "/dataset",
        provenance=lambda w: pipeline.key_file(P, "evaluate", w.game, int(w.seed)),
    output:
        score=RUN + "/score.json",
        fidelity=RUN + "/evaluate_fidelity.json",
        media=directory(RUN + "/evaluate_media"),
    params:
        **rerun_digests("evaluate"),
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


# The authors' released agents, per game of `released.games` (diamond/released.py): import the
# official checkpoint, then the evaluate stage's own code. Their runs live in runs/released/G.
RELEASED = "runs/released/{game}"


rule import_released:
    input:
        provenance=lambda w: pipeline.key_file(P, "import-released", w.game),
    output:
        world_model=RELEASED + "/world_model.pt",
        agent=RELEASED + "/agent.pt",
        source=RELEASED + "/source.json",
    params:
        **rerun_digests("import-released"),
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
        agent=RELEASED + "/agent.pt",
        provenance=lambda w: pipeline.key_file(P, "evaluate-released", w.game),
    output:
        score=RELEASED + "/score.json",
        fidelity=RELEASED + "/evaluate_fidelity.json",
        media=directory(RELEASED + "/evaluate_media"),
    params:
        seed=P["released"]["seed"],
        **rerun_digests("evaluate-released"),
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
        scores=pipeline.score_files(P),
        provenance=pipeline.key_file(P, "aggregate"),
    output:
        table="reports/atari100k_table.md",
        csv="reports/atari100k_table.csv",
        tex="reports/atari100k_table.tex",
        json="reports/atari100k_aggregate.json",
        released="reports/released_vs_paper.md",
    params:
        **rerun_digests("aggregate"),
    log:
        "logs/aggregate.log",
    threads: R["aggregate"]["threads"]
    resources:
        **rule_resources("aggregate"),
    shell:
        "{PY} -m stages.aggregate --params {PARAMS_FILE} --results {input.scores} --out reports "
        "> {log} 2>&1"
        " && {PY} -m stages.pipeline done --params {PARAMS_FILE} --stage aggregate --tool snakemake"


# The world-model study (paper section 5.1; params `study`, diamond/study.py), its own product:
# not part of `all`. `snakemake -j 2 study` trains and rolls out every variant x seed of
# study.variants x study.seeds on the static store study.dataset, then writes reports/study/.
# Study jobs live in study/{game}/{variant}-{seed}; the variant's definition reaches the stage
# command (and the rerun-on-params digests) from the params file.
STUDY = P["study"]
STUDY_JOB = "study/{game}/{variant}-{seed}"
STUDY_GAMES = pipeline.study_games(P)


def study_variant(name):
    return pipeline.study_variant(P, name)[1]


rule study:
    input:
        [f"{pipeline.STUDY_REPORTS_DIR}/study_table.md" for _ in STUDY_GAMES],


rule study_variant:
    input:
        dataset=STUDY["dataset"],
        provenance=lambda w: pipeline.key_file(P, "study", pipeline.study_job(w.game, w.variant), int(w.seed)),
    output:
        checkpoint=STUDY_JOB + "/denoiser.pt",
        errors=STUDY_JOB + "/errors.npz",
        metrics=STUDY_JOB + "/metrics.json",
    wildcard_constraints:
        variant="[A-Za-z][A-Za-z0-9_-]*",
    params:
        formulation=lambda w: study_variant(w.variant)["formulation"],
        num_steps=lambda w: study_variant(w.variant)["num_steps"],
        out_dir=lambda w: pipeline.study_job_dir(w.game, w.variant, int(w.seed)),
        **rerun_digests("study"),
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
        errors=lambda w: [pipeline.study_job_dir(g, v, s) + "/errors.npz" for g, v, s in pipeline.study_jobs(P)],
        provenance=lambda w: pipeline.key_file(P, "study-report", STUDY_GAMES[0]),
    output:
        table=pipeline.STUDY_REPORTS_DIR + "/study_table.md",
        csv=pipeline.STUDY_REPORTS_DIR + "/study_table.csv",
        json=pipeline.STUDY_REPORTS_DIR + "/study.json",
        curve=pipeline.STUDY_REPORTS_DIR + "/study_error_vs_horizon.png",
        frames=pipeline.STUDY_REPORTS_DIR + "/study_frames.png",
    params:
        game=lambda w: STUDY_GAMES[0],
        **rerun_digests("study-report"),
    log:
        "logs/study_report.log",
    threads: R["study_report"]["threads"]
    resources:
        **rule_resources("study_report"),
    shell:
        "{PY} -m stages.study_report --params {PARAMS_FILE} --game {params.game} --jobs-dir study/{params.game} "
        "--out " + pipeline.STUDY_REPORTS_DIR + " > {log} 2>&1"
        " && {PY} -m stages.pipeline done --params {PARAMS_FILE} --stage study-report --game {params.game} --tool snakemake"
