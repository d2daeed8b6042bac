"""Fault campaign: SIGKILL a pipeline stage at seeded random moments, rerun it until it completes,
and compare its final artifacts with an uninterrupted run's (issue 21, point 4).

    OMP_NUM_THREADS=1 nice -n 19 python scripts/fault_campaign.py --stage train-agent --kills 10 --seed 0 \
        [--params params.yaml] [--game Breakout] [--run-seed 0] [--work fault_campaign] [--table FILE]

The stage runs its real command, the one in dvc.yaml (without the `&& python -m stages.pipeline
done ...` provenance step), in a scratch tree WORK/<params>-<game>-<seed>/ holding a copy of the
params file as params.yaml and the upstream artifacts (built once, uninterrupted, in prep/ and
kept for later campaigns). Then:

1. reference/: the stage runs once, uninterrupted; its wall time is T_ref.
2. trial-1/, trial-2/, ...: a fresh copy of prep/; the stage is started and SIGKILLed (its whole
   process group) at a moment drawn uniformly in (0, T_ref) from `random.Random(seed)`, rerun,
   killed again, ... until an attempt completes. An attempt that completes before its kill moment
   ends the trial; the next trial starts from prep/ again, until N kills have been delivered (the
   last trial's attempts after the N-th kill run to completion unkilled).
3. Each trial's whole job directory (runs/G-S, or reports/ and runs/ for aggregate) is compared
   with the reference's, file by file (inputs included: nothing already written may be lost):
   - every file byte-identical, except
   - `.pt` checkpoints: equal when torch.load gives the same structure, every tensor equal
     (torch.equal, same dtype and shape) and every other value equal;
   - `.json` files and `.csv` curves: equal after leaving out wall-time fields, the keys/columns
     whose name matches WALL_TIME (seconds, per_second, ...): they measure the machine, not the
     result; the names actually left out are reported.
   Left out of the comparison: `.provenance/` (written by `stages.pipeline done`, not run here),
   train-agent's resume scratch `agent_state/` (not an output), mlflow.db.
4. One table row (printed, appended to --table, and WORK/.../campaign-STAGE-seedK.json):
   stage, kills delivered, trials, reruns, reruns that resumed from saved state (the stage's own
   "resumed from" line) or started from scratch, artifacts identical (and which differ), data lost
   (missing or differing files; work redone = attempts' total time - T_ref).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.layout import runs as pipeline_runs  # noqa: E402

STAGES = ["collect", "train-world-model", "train-agent", "evaluate", "aggregate"]
# Fields that measure the machine's speed, not the result (JSON keys anywhere, CSV columns).
WALL_TIME = re.compile(r"seconds|per_second|wall|timestamp|elapsed|duration")
# A rerun that continued from saved state says so on stdout (stages/train_world_model.py, train_agent.py).
RESUMED = re.compile(r"^(resumed from|train-agent \S+: resumed from)", re.M)
IGNORED_PARTS = {".provenance", "agent_state"}


def stage_command(stage: str, game: str, seed: int) -> str:
    """The stage's command from dvc.yaml for one game and seed, without the provenance step."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    cmd = spec.get("do", spec)["cmd"] if "matrix" not in spec else spec["cmd"]
    cmd = cmd.split(" && python -m stages.pipeline done", 1)[0]
    return cmd.replace("${item.game}", game).replace("${item.seed}", str(seed))


def stage_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tree / 'mlflow.db'}"
    env.setdefault("OMP_NUM_THREADS", "1")
    # `python` in the dvc.yaml command is this interpreter (the project's venv)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def start(cmd: str, tree: Path, log: Path) -> subprocess.Popen:
    # Own session, so that SIGKILL reaches the shell and every process under it.
    return subprocess.Popen(["bash", "-c", cmd], cwd=tree, env=stage_env(tree), start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def run_to_end(cmd: str, tree: Path, log: Path) -> float:
    t0 = time.monotonic()
    proc = start(cmd, tree, log)
    if proc.wait() != 0:
        raise SystemExit(f"error: `{cmd}` failed in {tree} (exit {proc.returncode}); see {log}")
    return time.monotonic() - t0


def prepare(work: Path, params: Path, stage: str, game: str, seed: int) -> Path:
    """prep/: the params file and every upstream artifact, built once, uninterrupted."""
    prep = work / "prep"
    prep.mkdir(parents=True, exist_ok=True)
    if not (prep / "params.yaml").exists():
        shutil.copyfile(params, prep / "params.yaml")
    elif (prep / "params.yaml").read_bytes() != params.read_bytes():
        raise SystemExit(f"error: {prep} was prepared from another params file; remove it or choose --work")
    raw = yaml.safe_load(params.read_text())
    jobs = pipeline_runs(raw) if stage == "aggregate" else [(game, seed)]
    for up in STAGES[: STAGES.index(stage)]:
        for g, s in jobs:
            marker = prep / f".done-{up}-{g}-{s}"
            if not marker.exists():
                print(f"prep: {up} {g}-{s}", flush=True)
                run_to_end(stage_command(up, g, s), prep, prep / f"{up}-{g}-{s}.log")
                marker.touch()
    return prep


def copy_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.log", "mlflow.db*", "mlruns", "mlartifacts"))


def compared_files(tree: Path) -> dict[str, Path]:
    out = {}
    for top in ("runs", "reports"):
        for p in sorted((tree / top).rglob("*")):
            rel = p.relative_to(tree)
            if p.is_file() and not IGNORED_PARTS & set(rel.parts):
                out[rel.as_posix()] = p
    return out


def _same(a: Any, b: Any, where: str, excluded: set[str]) -> str | None:
    """None if equal, else where they first differ. Keys matching WALL_TIME are left out."""
    import numpy as np
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        ka = {k for k in a if not (isinstance(k, str) and WALL_TIME.search(k))}
        kb = {k for k in b if not (isinstance(k, str) and WALL_TIME.search(k))}
        excluded.update(str(k) for k in (set(a) | set(b)) - ka - kb)
        if ka != kb:
            return f"{where}: keys {sorted(map(str, ka ^ kb))}"
        for k in sorted(ka, key=str):
            d = _same(a[k], b[k], f"{where}.{k}", excluded)
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = _same(x, y, f"{where}[{i}]", excluded)
            if d:
                return d
        return None
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        ok = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return None if ok else f"{where}: tensor differs"
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return None if a.dtype == b.dtype and np.array_equal(a, b) else f"{where}: array differs"
    if type(a) is not type(b):
        return f"{where}: type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, float) and a != a and b != b:  # NaN
        return None
    try:
        return None if a == b else f"{where}: {a!r} != {b!r}"
    except Exception:  # noqa: BLE001 - objects without equality: compare their repr
        return None if repr(a) == repr(b) else f"{where}: differs"


def _csv_rows(path: Path, excluded: set[str]) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    for row in rows:
        for k in [k for k in row if k and WALL_TIME.search(k)]:
            excluded.add(k)
            del row[k]
    return rows


def compare_file(a: Path, b: Path, excluded: set[str]) -> str | None:
    """None when equal under the campaign's rules (module docstring), else why not."""
    if a.read_bytes() == b.read_bytes():
        return None
    if a.suffix == ".pt":
        from diamond.io import load_torch

        return _same(load_torch(a), load_torch(b), "", excluded)
    if a.suffix == ".json":
        return _same(json.loads(a.read_text()), json.loads(b.read_text()), "", excluded)
    if a.suffix == ".csv":
        return _same(_csv_rows(a, excluded), _csv_rows(b, excluded), "", excluded)
    return "bytes differ"


def compare_trees(ref: Path, trial: Path, excluded: set[str]) -> tuple[list[str], list[str], list[str]]:
    """(missing in trial, extra in trial, differing) relative paths."""
    fa, fb = compared_files(ref), compared_files(trial)
    differ = []
    for rel in sorted(set(fa) & set(fb)):
        why = compare_file(fa[rel], fb[rel], excluded)
        if why:
            differ.append(f"{rel} ({why.lstrip('.: ')})")
    return sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa)), differ


def _grouped(paths: list[str]) -> list[str]:
    """Files under a temporary directory, as that directory and a count."""
    groups: dict[str, int] = {}
    for rel in paths:
        parts = rel.split("/")
        cut = next((i for i, part in enumerate(parts[:-1]) if part.endswith(".tmp")), None)
        key = rel if cut is None else "/".join(parts[: cut + 1]) + "/"
        groups[key] = groups.get(key, 0) + 1
    return [k if n == 1 and not k.endswith("/") else f"{k} ({n} files)" for k, n in groups.items()]


def campaign(args: argparse.Namespace) -> dict[str, Any]:
    raw = yaml.safe_load(args.params.read_text())
    game = args.game or raw["games"][0]
    seed = raw["seeds"][0] if args.run_seed is None else args.run_seed
    work = args.work / f"{args.params.stem}-{game}-{seed}"
    cmd = stage_command(args.stage, game, seed)
    prep = prepare(work, args.params, args.stage, game, seed)
    rng = random.Random(args.seed)

    ref = work / f"reference-{args.stage}"
    info = ref / ".campaign-reference.json"
    if not info.exists() or json.loads(info.read_text())["cmd"] != cmd:
        copy_tree(prep, ref)
        print(f"reference: {cmd}", flush=True)
        t_ref = run_to_end(cmd, ref, ref / "stage.log")
        info.write_text(json.dumps({"cmd": cmd, "seconds": t_ref}))
    t_ref = json.loads(info.read_text())["seconds"]
    print(f"reference: {t_ref:.1f} s", flush=True)

    kills, trials, attempts_log, excluded = 0, [], [], set()
    while kills < args.kills or not trials:
        tdir = work / f"trial-{args.stage}-seed{args.seed}-{len(trials) + 1}"
        copy_tree(prep, tdir)
        attempts = []
        while True:
            kill_at = rng.uniform(0.0, t_ref) if kills < args.kills else None
            log = tdir / f"attempt-{len(attempts) + 1}.log"
            t0 = time.monotonic()
            proc = start(cmd, tdir, log)
            try:
                rc = proc.wait(timeout=kill_at)
                killed = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                killed = True
                kills += 1
            text = log.read_text(errors="replace")
            resumed = bool(RESUMED.search(text))
            attempt = {"trial": len(trials) + 1, "attempt": len(attempts) + 1, "kill_at": kill_at,
                       "seconds": round(time.monotonic() - t0, 2), "killed": killed, "rc": rc, "resumed": resumed,
                       "resume_line": next((ln for ln in text.splitlines() if RESUMED.match(ln)), None)}
            attempts.append(attempt)
            print(json.dumps(attempt), flush=True)
            if not killed:
                break
        if attempts[-1]["rc"] != 0:
            trials.append({"dir": str(tdir), "failed": f"exit {attempts[-1]['rc']}, see {log}",
                           "missing": [], "extra": [], "differ": []})
            attempts_log += attempts
            break
        missing, extra, differ = compare_trees(ref, tdir, excluded)
        trials.append({"dir": str(tdir), "missing": missing, "extra": extra, "differ": differ,
                       "seconds": sum(a["seconds"] for a in attempts)})
        attempts_log += attempts
        print(json.dumps(trials[-1]), flush=True)

    reruns = [a for a in attempts_log if a["attempt"] > 1]
    identical = all(not (t["missing"] or t["extra"] or t["differ"] or t.get("failed")) for t in trials)
    redone = sum(t.get("seconds", 0.0) for t in trials) - t_ref * len(trials)
    bad = [f"trial {i + 1}: " + "; ".join(
        [t["failed"]] if t.get("failed") else
        [f"missing {m}" for m in t["missing"]] + [f"left behind {e}" for e in _grouped(t["extra"])] + t["differ"])
        for i, t in enumerate(trials) if t.get("failed") or t["missing"] or t["extra"] or t["differ"]]
    return {
        "stage": args.stage, "game": game, "run_seed": seed, "params": str(args.params), "campaign_seed": args.seed,
        "kills": kills, "trials": len(trials), "reruns": len(reruns),
        "resumed": sum(a["resumed"] for a in reruns), "restarted": sum(not a["resumed"] for a in reruns),
        "identical": identical, "differences": bad, "wall_time_fields_excluded": sorted(excluded),
        "reference_seconds": round(t_ref, 1), "work_redone_seconds": round(redone, 1),
        "missing": sorted({m for t in trials for m in t["missing"]}),
        "attempts": attempts_log,
    }


TABLE_HEADER = ("| stage | kills | trials | reruns | resumed | restarted | artifacts identical | data lost | T_ref | work redone |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def table_row(r: dict[str, Any]) -> str:
    ident = "yes" if r["identical"] else "no: " + " / ".join(r["differences"])
    lost = "none" if not r["missing"] else "missing " + ", ".join(r["missing"])
    return (f"| {r['stage']} | {r['kills']} | {r['trials']} | {r['reruns']} | {r['resumed']} | {r['restarted']} | "
            f"{ident} | {lost} | {r['reference_seconds']} s | {r['work_redone_seconds']} s |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--kills", required=True, type=int, help="SIGKILLs to deliver (N)")
    p.add_argument("--seed", required=True, type=int, help="seed of the kill moments (K)")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--game", default=None, help="default: the params file's first game")
    p.add_argument("--run-seed", type=int, default=None, help="the pipeline seed; default: the params file's first")
    p.add_argument("--work", type=Path, default=ROOT / "fault_campaign", help="scratch directory")
    p.add_argument("--table", type=Path, default=None, help="markdown file to append the row to")
    args = p.parse_args(argv)
    if args.kills < 0:
        p.error(f"--kills: {args.kills}; allowed: 0 or more")
    args.params, args.work = args.params.resolve(), args.work.resolve()
    result = campaign(args)
    out = args.work / f"{args.params.stem}-{result['game']}-{result['run_seed']}" / f"campaign-{args.stage}-seed{args.seed}.json"
    out.write_text(json.dumps(result, indent=1))
    row = table_row(result)
    if args.table:
        new = not args.table.exists()
        with open(args.table, "a") as f:
            f.write((TABLE_HEADER + "\n" if new else "") + row + "\n")
    print(TABLE_HEADER + "\n" + row)
    print(f"wall-time fields left out: {', '.join(result['wall_time_fields_excluded']) or 'none'}; details: {out}")
    if not result["identical"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
