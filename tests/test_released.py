"""The authors' released agents: locating the checkpoint (local folder, Hugging Face cache, a real
download by huggingface_hub from a local Hub server), the import-released and evaluate-released
stages through DVC and Snakemake, and the comparison report. No test needs the internet: the
"released" checkpoint is the official-format fixture (tests/fixtures/official), whose 3 actions
are Freeway's."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from agent_helpers import stage_env
from conftest import ROOT, write_params
from diamond.agent.evaluation import agent_test_returns
from diamond.config import params_from_dict
from diamond.models.actor_critic import ActorCritic
from pipeline_repo import dvc_stages_run, make_repo, run_tool
from test_import_official import one_line_error
from test_official_parity import FIXTURE, fixture_params_dict

GAME = "Freeway"
OFFICIAL = FIXTURE / "tiny_agent.pt"
SHA256 = hashlib.sha256(OFFICIAL.read_bytes()).hexdigest()
RELEASED_NAME = "DIAMOND (released agents, this protocol)"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def released_params(released_dir: Path, episodes: int = 2) -> dict:
    d = fixture_params_dict()
    d["games"] = []
    d["env"]["max_episode_frames"] = 400
    d["released"].update(games=[GAME], dir=str(released_dir))
    d["evaluate"].update(episodes=episodes, num_envs=2, fidelity_episodes=1, fidelity_horizons=[1, 2], gif_frames=4)
    return d


class HubHandler(http.server.BaseHTTPRequestHandler):
    """The two requests hf_hub_download makes for a file (HEAD, then GET of
    /{repo_id}/resolve/{revision}/{filename}), answered as the Hub does, with its headers."""

    files: dict[str, bytes] = {}

    def _headers(self) -> bytes | None:
        data = self.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(200)
        self.send_header("X-Repo-Commit", HUB_COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return data

    def do_HEAD(self) -> None:  # noqa: N802
        self._headers()

    def do_GET(self) -> None:  # noqa: N802
        data = self._headers()
        if data is not None:
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[str]:
    HubHandler.files = {f"eloialonso/diamond/resolve/main/atari_100k/models/{GAME}.pt": OFFICIAL.read_bytes()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def import_released(tmp: Path, params: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stages.import_released", "--params", str(params), "--game", GAME,
           "--out-world-model", str(out / "world_model.pt"), "--out-agent", str(out / "agent.pt"),
           "--out-source", str(out / "source.json")]
    return subprocess.run(cmd, cwd=ROOT, env={**stage_env(tmp), **env}, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # ~20 s: three import_released stage processes
def test_download_then_cache_then_local_folder(tmp_path: Path, hub: str) -> None:
    folder = tmp_path / "pretrained"
    params = write_params(tmp_path / "params.yaml", released_params(folder))
    hf = {"HF_ENDPOINT": hub, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}

    done = import_released(tmp_path, params, tmp_path / "a", **hf)
    assert done.returncode == 0, done.stderr[-3000:]
    source = json.loads((tmp_path / "a" / "source.json").read_text())
    assert (source["source"], source["sha256"], source["commit"]) == ("download", SHA256, HUB_COMMIT)
    assert torch.load(tmp_path / "a" / "agent.pt", weights_only=False)["imported_from"]["sha256"] == SHA256

    # the Hub is gone: the cached copy is used, the network is not asked
    done = import_released(tmp_path, params, tmp_path / "b", **{**hf, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "source.json").read_text())["source"] == "hf-cache"

    # a file in released.dir comes first
    folder.mkdir()
    (folder / f"{GAME}.pt").write_bytes(OFFICIAL.read_bytes())
    done = import_released(tmp_path, params, tmp_path / "c", **hf)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "c" / "source.json").read_text())["source"] == "dir"
    agents = [torch.load(tmp_path / x / "agent.pt", weights_only=False)["actor_critic"] for x in "abc"]
    assert all(torch.equal(agents[0][k], a[k]) for a in agents[1:] for k in agents[0])


def test_missing_checkpoint_is_a_one_line_error_naming_file_and_folder(tmp_path: Path) -> None:
    folder = tmp_path / "pretrained"
    params = write_params(tmp_path / "params.yaml", released_params(folder))
    done = import_released(tmp_path, params, tmp_path / "out", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hf"))
    one_line_error(done, f"released checkpoint of {GAME} not found", f"put {GAME}.pt", f"in {folder}/")
    assert not (tmp_path / "out").exists()


def test_batched_test_episodes_do_not_depend_on_the_number_of_emulators(tiny_params) -> None:
    """Episode i has its own seeds: 1, 2 or 3 emulators give the same returns (and episode 0's film)."""
    torch.manual_seed(0)
    ac = ActorCritic(tiny_params.actor_critic, 4, tiny_params.env.obs_size).eval()
    runs = [agent_test_returns("Breakout", 5, tiny_params.env, ac, 0.1, 3, n, torch.device("cpu"), film_frames=6)
            for n in (1, 2, 3)]
    assert runs[0][0] == runs[1][0] == runs[2][0]
    assert all(np.array_equal(a, b) for a, b in zip(runs[0][1], runs[2][1])) and len(runs[0][1]) == 6
    other = agent_test_returns("Breakout", 6, tiny_params.env, ac, 0.1, 3, 3, torch.device("cpu"))[0]
    assert other != runs[0][0]  # another evaluation seed, other episodes


def test_released_config_is_the_paper_config_without_training_runs() -> None:
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    released = yaml.safe_load((ROOT / "configs" / "released.yaml").read_text())
    assert released["games"] == [] and released["released"]["games"] == paper["games"]
    for d in (paper, released):
        d.pop("games")
        d["released"].pop("games")
    assert released == paper
    params_from_dict(yaml.safe_load((ROOT / "configs" / "released.yaml").read_text()))


@pytest.mark.slow
def test_released_variant_through_dvc_and_snakemake(tmp_path: Path) -> None:
    folder = tmp_path / "pretrained"
    folder.mkdir()
    (folder / f"{GAME}.pt").write_bytes(OFFICIAL.read_bytes())
    params = released_params(folder)
    scores = {}
    for tool in ("dvc", "snakemake"):
        repo = make_repo(tmp_path / tool, params)
        store = tmp_path / f"{tool}-mlflow.db"
        if tool == "dvc":
            out = run_tool(repo, store, "dvc", "repro")
            assert dvc_stages_run(out) == {f"import-released@{GAME}", f"evaluate-released@{GAME}", "aggregate"}
            assert not dvc_stages_run(run_tool(repo, store, "dvc", "repro"))
        else:
            run_tool(repo, store, "snakemake", "-j", "2")
        score = json.loads((repo / "runs" / "released" / GAME / "score.json").read_text())
        assert score["method"] == RELEASED_NAME and score["imported_from"]["sha256"] == SHA256
        scores[tool] = score["episode_returns"]
        table = (repo / "reports" / "atari100k_table.md").read_text()
        assert RELEASED_NAME in table.splitlines()[0]
        comparison = (repo / "reports" / "released_vs_paper.md").read_text()
        assert f"| {GAME} |" in comparison and "33.8" in comparison  # the paper's best Freeway seed
    assert scores["dvc"] == scores["snakemake"]
