"""What it costs to ask both tools what must run, at the paper's 130 runs (README, "Sharing results").

In a scratch copy of the project with `configs/paper.yaml` as params.yaml, times `snakemake -n`,
`dvc status` and `python -m stages.pipeline stale`: first with nothing built, then with every
job's outputs on disk, recorded (`stages.pipeline done --tool manual`, in process) and committed
to dvc.lock (`dvc commit --force`). The built outputs are small stand-ins (a few KiB per job),
so the figures are the tools' own cost per job, not the hashing of paper-size data: the plan
reads files up to 1 MiB by content and larger ones by size only, and `dvc status` hashes a file
again only when its size, inode or date changed (DVC's state cache).

    python -m benchmarks.plan_cost --work /tmp/plan_cost [--json reports/bench/plan_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages import layout, provenance  # noqa: E402

BIN = Path(sys.executable).parent


def project_copy(work: Path, params_file: Path) -> Path:
    """The files git would commit, params_file as params.yaml, one commit."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    repo = work / "repo"
    shutil.rmtree(work, ignore_errors=True)
    for rel in (f for f in listed if f and (ROOT / f).is_file()):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    (repo / "dvc.lock").unlink(missing_ok=True)
    shutil.copy(params_file, repo / "params.yaml")
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "scratch"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)
    return repo


def timed(repo: Path, *cmd: str) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    t = time.perf_counter()
    p = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {(p.stderr or p.stdout)[-2000:]}")
    return seconds, p.stdout + p.stderr


def build_stand_ins(repo: Path) -> int:
    """Every job's outputs as small files, each job recorded as done; returns the job count."""
    cwd = Path.cwd()
    os.chdir(repo)
    try:
        params = layout.load_raw("params.yaml")
        jobs = layout.all_jobs(params)
        for stage, game, seed in jobs:
            base = Path(layout.job_dir(stage, game, seed))
            for name in layout.STAGE_OUTPUTS[stage]:
                path = base / name
                if "." in name:  # a file
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps({"stand_in": str(path)}) + "\n")
                else:  # a folder output: a few files
                    path.mkdir(parents=True, exist_ok=True)
                    for i in range(3):
                        (path / f"part_{i}.bin").write_bytes(os.urandom(1024))
            provenance.record_done("params.yaml", stage, game, seed, "manual")
        # aggregate's figures: DVC plots, not in the record
        for plot in yaml.safe_load(Path("dvc.yaml").read_text())["stages"]["aggregate"]["plots"]:
            Path(next(iter(plot))).write_bytes(b"stand-in")
        return len(jobs)
    finally:
        os.chdir(cwd)


def measure(repo: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    out["snakemake_n_s"], text = timed(repo, str(BIN / "snakemake"), "-n", "--quiet", "rules")
    out["dvc_status_s"], _ = timed(repo, str(BIN / "dvc"), "status")
    out["stale_s"], _ = timed(repo, sys.executable, "-m", "stages.pipeline", "stale")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "configs" / "paper.yaml")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    params = args.params.resolve()
    shown = params.relative_to(ROOT).as_posix() if params.is_relative_to(ROOT) else str(params)
    result: dict[str, object] = {"params": shown, "runs": len(layout.runs(layout.load_raw(params)))}
    repo = project_copy(args.work, params)
    result["nothing_built"] = measure(repo)
    print("nothing built:", result["nothing_built"], flush=True)
    result["jobs"] = build_stand_ins(repo)
    result["dvc_commit_s"], _ = timed(repo, str(BIN / "dvc"), "commit", "--force", "--quiet")
    measure(repo)  # the first pass fills DVC's state cache; what a user pays every time is the second
    result["all_built"] = measure(repo)
    print("all built:", result["all_built"], flush=True)
    # the stand-ins are current for both tools: nothing to run
    assert "Nothing to be done" in timed(repo, str(BIN / "snakemake"), "-n")[1]
    assert "up to date" in timed(repo, str(BIN / "dvc"), "status")[1]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
