"""Stage import-released: the authors' released agent of one game -> this project's checkpoints.

Finds `released.filename` for the game (the `released.dir` folder, else the Hugging Face cache,
else a download from `released.repo_id` at `released.revision`; diamond/official/released.py), converts
it like stages.import_official, and writes --out-source, a JSON record of the file (where it was
found, its sha256, the repository coordinates) that evaluate's score file and MLflow tags carry
on. The params must describe the official architecture (configs/released.yaml).

    python -m stages.import_released --params configs/released.yaml --game Breakout \\
        --out-world-model runs/released/Breakout/world_model.pt \\
        --out-agent runs/released/Breakout/agent.pt --out-source runs/released/Breakout/source.json
"""

from __future__ import annotations

from pathlib import Path


from diamond.env.atari import check_game
from diamond.io import atomic_write_json
from diamond.official.released import locate_released
from stages import tracking
from stages.common import base_parser, forget_provenance, load_checked_params, run_main, stage_sections
from stages.import_official import convert, parameter_summary, read_official
from stages.tracking import stage_run


def main() -> None:
    parser = base_parser("Import the authors' released DIAMOND agent of one game.", per_run=False)
    parser.add_argument("--game", required=True, help="Atari 100k game, e.g. Breakout")
    parser.add_argument("--out-world-model", required=True, type=Path)
    parser.add_argument("--out-agent", required=True, type=Path)
    parser.add_argument("--out-source", required=True, type=Path, help="JSON record of the released file")
    args = parser.parse_args()
    p = load_checked_params(args)
    check_game(args.game)
    forget_provenance(args.out_agent.parent, "import-released")
    found = locate_released(p.released, args.game)
    state = read_official(found.path, args.game)
    source = found.record(p.released)
    with stage_run("import-released", sections=stage_sections(p, "import-released"), game=args.game, seed=p.released.seed,
                   inputs=[found.path], job_dir=args.out_agent.parent):
        tracking.set_tags({"official_checkpoint_sha256": found.sha256, **{f"released.{k}": v for k, v in source.items()}})
        counts = convert(p, args.game, p.released.seed, state, args.out_world_model, args.out_agent, source)
        tracking.log_metrics({f"parameters.{k}": v for k, v in counts.items()})
        atomic_write_json(args.out_source, {"game": args.game, **source, "parameters": counts})
    print(f"import-released {args.game}: {found.path} ({found.source}, sha256 {found.sha256[:12]}) -> "
          f"{args.out_agent}; {parameter_summary(counts)}")


if __name__ == "__main__":
    run_main(main)
