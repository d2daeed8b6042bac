"""Bad-input campaign: try every kind of bad input the stages read and tabulate the messages.

    python scripts/bad_input_campaign.py [--params params.yaml] [--out bad_inputs.md] [--quick]

Params: every leaf key of the params file with a value of the wrong type, every key made
negative (numbers) or emptied (lists), an unknown key in every section and at the top, a
missing key in every section. Each case goes through `load_params` (what every stage does
first) and then any stage-only checks (`STAGE_CHECKS`, none today), so the table says where a bad
value is caught: "load" (before any stage runs), "stage <name>" (when that stage starts), or
"ACCEPTED" (nowhere). Artifacts: an episode store with a missing, truncated or altered episode
file; world-model and agent checkpoints of another game, of another format version, truncated.
Every message must be one line; the script exits non-zero if one is not, or if a malformed
value is accepted where its type is wrong.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from diamond.agent.checkpoint import agent_checkpoint, read_agent_checkpoint
from diamond.config import ConfigError, Params, params_from_dict, to_dict
from diamond.data import EpisodeStore
from diamond.env.atari import make_env, num_actions
from diamond.env.collector import Collector, UniformPolicy
from diamond.io import ArtifactError, atomic_save_torch
from diamond.models.actor_critic import ActorCritic
from diamond.world_model.model import build_world_model, read_checkpoint, save_world_model, world_model_state
# Every params check happens when params load (diamond/config.py); the stages check nothing more.
# A stage check added later goes here, so that the table shows it as "stage <name>".
STAGE_CHECKS: list[tuple[str, Callable[[Params], None]]] = []


@dataclass
class Outcome:
    case: str
    caught: str  # "load", "stage <name>", "ACCEPTED"
    message: str

    @property
    def one_line(self) -> bool:
        return "\n" not in self.message


def leaves(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, d


def with_value(d: dict, key: str, value: Any) -> dict:
    out = copy.deepcopy(d)
    node = out
    *parents, last = key.split(".")
    for k in parents:
        node = node[k]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()


def judge(case: str, data: dict) -> Outcome:
    try:
        p = params_from_dict(data)
    except ConfigError as e:
        return Outcome(case, "load", str(e))
    for stage, check in STAGE_CHECKS:
        try:
            check(p)
        except (ConfigError, ArtifactError, ValueError) as e:
            return Outcome(case, f"stage {stage}", str(e))
    return Outcome(case, "ACCEPTED", "")


def wrong_type(value: Any) -> Any:
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "ten"
    if isinstance(value, str):
        return 12
    if isinstance(value, list):
        return "not-a-list"
    return 5


def params_cases(base: dict, quick: bool) -> list[Outcome]:
    out = []
    keys = list(leaves(base))
    if quick:
        keys = keys[::7]
    for key, value in keys:
        out.append(judge(f"`{key}` = {wrong_type(value)!r} (wrong type)", with_value(base, key, wrong_type(value))))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(judge(f"`{key}` = -1 (negative)", with_value(base, key, -1)))
        elif isinstance(value, list) and value:
            out.append(judge(f"`{key}` = [] (empty)", with_value(base, key, [])))
    sections = [""] + [k for k, v in base.items() if isinstance(v, dict)]
    for section in sections:
        key = f"{section}.bogus_key" if section else "bogus_key"
        out.append(judge(f"unknown key `{key}`", with_value(base, key, 1)))
        if section:
            first = next(iter(base[section]))
            out.append(judge(f"missing key `{section}.{first}`", with_value(base, f"{section}.{first}", _DELETE)))
    return out


def artifact_cases(base: dict, tmp: Path) -> list[Outcome]:
    p = params_from_dict(base)
    game, other = "Breakout", "Pong"
    store = EpisodeStore(tmp / "store", game=game, num_actions=num_actions(game))
    env = make_env(game, 0, train=True, config=p.env)
    Collector(env, UniformPolicy(num_actions(game), np.random.default_rng(0)), store).collect(300)
    env.close()
    out = []

    def damaged(name: str, damage: Callable[[Path], None]) -> None:
        copy_root = tmp / name
        shutil.copytree(tmp / "store", copy_root)
        episode = sorted(copy_root.glob("episode_*.npz"))[0]
        damage(episode)
        try:
            s = EpisodeStore(copy_root, game=game)
            for i in range(len(s)):
                s[i]
            out.append(Outcome(f"dataset: {name}", "ACCEPTED", ""))
        except (ArtifactError, ConfigError) as e:
            out.append(Outcome(f"dataset: {name}", "load", str(e)))

    damaged("an episode file missing", lambda f: f.unlink())
    damaged("an episode file truncated", lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]))
    damaged("an episode file altered (one byte)", lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:]))
    try:
        EpisodeStore(tmp / "store", game=other)
        out.append(Outcome("dataset: of another game", "ACCEPTED", ""))
    except (ArtifactError, ConfigError) as e:
        out.append(Outcome("dataset: of another game", "load", str(e)))

    wm = build_world_model(p.world_model, num_actions(game), p.env.obs_size, torch.device("cpu"))
    save_world_model(tmp / "wm.pt", wm)
    ac = ActorCritic(p.actor_critic, num_actions(game), p.env.obs_size)
    atomic_save_torch(tmp / "agent.pt", agent_checkpoint(game, 0, num_actions(game), to_dict(p), ac.state_dict(),
                                                         world_model_state(wm)))
    ckpt = torch.load(tmp / "wm.pt", weights_only=False)
    ckpt["format"] = "diamond-world-model/1"
    torch.save(ckpt, tmp / "wm_old.pt")
    (tmp / "wm_truncated.pt").write_bytes((tmp / "wm.pt").read_bytes()[:4000])
    agent = torch.load(tmp / "agent.pt", weights_only=False)
    agent["format"] = "diamond-agent/1"
    torch.save(agent, tmp / "agent_old.pt")
    for case, call in [
        ("world-model checkpoint: older format version", lambda: read_checkpoint(tmp / "wm_old.pt")),
        ("world-model checkpoint: truncated", lambda: read_checkpoint(tmp / "wm_truncated.pt")),
        ("agent checkpoint: of another game", lambda: read_agent_checkpoint(tmp / "agent.pt", other)),
        ("agent checkpoint: older format version", lambda: read_agent_checkpoint(tmp / "agent_old.pt", game)),
        ("agent checkpoint: a world-model checkpoint instead", lambda: read_agent_checkpoint(tmp / "wm.pt", game)),
    ]:
        try:
            call()
            out.append(Outcome(case, "ACCEPTED", ""))
        except (ArtifactError, ConfigError) as e:
            out.append(Outcome(case, "load", str(e)))
    return out


def table(outcomes: list[Outcome]) -> str:
    lines = ["| case | caught at | message |", "| --- | --- | --- |"]
    for o in outcomes:
        msg = o.message.replace("|", "\\|") if o.message else "–"
        lines.append(f"| {o.case} | {o.caught} | {msg} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, help="write the Markdown table here too")
    ap.add_argument("--quick", action="store_true", help="every 7th key only (the test's short version)")
    args = ap.parse_args(argv)
    base = yaml.safe_load(Path(args.params).read_text())
    outcomes = params_cases(base, args.quick)
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp:
        outcomes += artifact_cases(base, Path(tmp))
    text = table(outcomes)
    print(text)
    if args.out:
        args.out.write_text(text)
    multi = [o for o in outcomes if not o.one_line]
    wrong_type_accepted = [o for o in outcomes if "(wrong type)" in o.case and o.caught == "ACCEPTED"]
    accepted = [o for o in outcomes if o.caught == "ACCEPTED"]
    print(f"{len(outcomes)} cases: {len(outcomes) - len(accepted)} rejected "
          f"({sum(o.caught == 'load' for o in outcomes)} at load), {len(accepted)} accepted, "
          f"{len(multi)} multi-line messages", file=sys.stderr)
    return 1 if multi or wrong_type_accepted else 0


if __name__ == "__main__":
    sys.exit(main())
