"""`python -m stages.play` in a real browser: headless Chromium (Debian's `chromium`) opens the
page and is driven over the DevTools protocol through --remote-debugging-pipe (no websocket
client needed), so the key presses go through the browser's own input path to the page's handlers.

Checked: frames advance under the agent; a held key and single steps give exactly the frames the
world model predicts for that action and seed (and not those of another action); a recorded
episode loads back with EpisodeStore; side by side shows the real game and a pixel error; bad
inputs are one-line errors. The screenshot goes to $TEST_ARTIFACTS_DIR/play.png (README's
docs/play.png is such a screenshot).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_params_dict

from diamond.agent.checkpoint import agent_checkpoint
from diamond.config import params_from_dict, to_dict
from diamond.data import EpisodeStore
from diamond.data.frames import to_float, to_uint8
from diamond.io import atomic_save_torch
from diamond.models.actor_critic import ActorCritic
from diamond.play.session import RealGame
from diamond.seeds import derived_seed
from diamond.world_model.model import build_world_model, load_world_model, save_world_model, world_model_state

GAME, SEED, NOOP, LEFT, STEPS = "Breakout", 3, 0, 3, 3
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # as tests/test_mlflow_ui.py
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", ROOT / ".pytest_cache" / "artifacts"))
pytestmark = pytest.mark.slow  # 25-60 s on the shared 2-core machine: three play processes and a browser


def tiny_params():
    d = tiny_params_dict()
    d["channels_last"] = False  # the test's direct computation runs the same kernels
    d["world_model"]["reward_end_prior_init"] = True
    return params_from_dict(d)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained agent checkpoint whose world model depends on its inputs (the zero-initialised
    output layers get small random weights) and whose R never predicts an end (so a test episode
    is not cut short), plus its world model alone."""
    tmp = tmp_path_factory.mktemp("play")
    p = tiny_params()
    torch.manual_seed(0)
    wm = build_world_model(p.world_model, 4, p.env.obs_size, torch.device("cpu"))
    with torch.no_grad():
        for param in wm.denoiser.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(0, 0.05)
        wm.reward_end.head[-1].weight.zero_()
        wm.reward_end.init_heads_to_priors(np.array([1, 10**6, 1]), np.array([10**6, 1]))
    ac = ActorCritic(p.actor_critic, 4, p.env.obs_size)
    atomic_save_torch(tmp / "agent.pt", agent_checkpoint(GAME, 0, 4, to_dict(p), ac.state_dict(), world_model_state(wm)))
    save_world_model(tmp / "world_model.pt", wm)
    return {"agent": tmp / "agent.pt", "world_model": tmp / "world_model.pt", "tmp": tmp}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def play_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages.play", *args]


def play_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path]) -> Iterator[dict[str, Any]]:
    tmp, port = checkpoints["tmp"], free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(play_command("--agent", str(checkpoints["agent"]), "--port", str(port), "--seed", str(SEED),
                                         "--record-dir", str(tmp / "records")),
                            cwd=tmp, env=play_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()
            try:
                urllib.request.urlopen(url + "api/state", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "play server did not answer in 90 s"
                time.sleep(0.3)
        yield {"url": url, "tmp": tmp, "proc": proc}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def api_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "api/state", timeout=10) as r:
        return json.loads(r.read())


def decode_png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).transpose(2, 0, 1)


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe: NUL-terminated JSON messages,
    commands on the browser's fd 3, replies and events on its fd 4."""

    def __init__(self, profile: Path) -> None:
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()

        def fds() -> None:  # in the child, before exec
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--remote-debugging-pipe",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={profile}", "--window-size=1100,900"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.next_id, self.buffer, self.session = 0, b"", None

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.from_browser, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def eval(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    KEYS = {"ArrowLeft": ("ArrowLeft", 37, ""), "Enter": ("Enter", 13, "\r"), ".": ("Period", 190, "."),
            "m": ("KeyM", 77, "m"), "p": ("KeyP", 80, "p"), "r": ("KeyR", 82, "r"), "v": ("KeyV", 86, "v")}

    def key(self, key: str, down: bool = True, up: bool = True) -> None:
        code, vk, text = self.KEYS[key]
        common = dict(key=key, code=code, windowsVirtualKeyCode=vk, nativeVirtualKeyCode=vk)
        if down:
            self.send("Input.dispatchKeyEvent", type="keyDown" if text else "rawKeyDown", text=text, **common)
        if up:
            self.send("Input.dispatchKeyEvent", type="keyUp", **common)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.to_browser)
        os.close(self.from_browser)


def wait_until(what: str, check, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def predicted_frames(agent: Path, episode: int, action: int, steps: int) -> list[np.ndarray]:
    """The world model called directly: episode `episode`'s real start, torch seeded as the play
    session seeds it, then `steps` times the sampler and R on `action` (with R's two draws per
    step, the random numbers an imagination step takes: diamond/agent/imagination.py)."""
    p = tiny_params()
    ckpt = torch.load(agent, weights_only=False)
    wm = load_world_model(agent, torch.device("cpu"), ckpt=ckpt["world_model"])
    wm.denoiser.eval(), wm.reward_end.eval()
    context = p.world_model.denoiser.num_conditioning_frames
    start = RealGame(GAME, p.env, SEED, train=False).start(SEED, episode, context)
    torch.manual_seed(derived_seed(SEED, episode))
    obs = to_float(start.obs)[None]
    act = torch.as_tensor(np.append(start.act, action))[None]
    frames = []
    with torch.no_grad():
        _, _, state = wm.reward_end(obs[:, :-1], act[:, :-1], obs[:, 1:])
        for _ in range(steps):
            next_obs = wm.sampler.sample(obs, act)
            logits_rew, logits_end, state = wm.reward_end(obs[:, -1:], act[:, -1:], next_obs[:, None], state)
            torch.distributions.Categorical(logits=logits_rew[:, 0]).sample()
            torch.distributions.Categorical(logits=logits_end[:, 0]).sample()
            frames.append(to_uint8(next_obs[0]))
            obs = torch.cat([obs[:, 1:], next_obs[:, None]], dim=1)
            act = torch.cat([act[:, 1:], torch.tensor([[action]])], dim=1)
    return frames


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`)")
def test_play_in_the_browser(server: dict[str, Any], checkpoints: dict[str, Path]) -> None:
    url, tmp = server["url"], server["tmp"]
    browser = DevTools(tmp / "chromium-profile")
    try:
        browser.open(url)
        # Frames advance: the agent plays at the target rate and the page draws new frames.
        wait_until("frames drawn", lambda: (browser.eval("window.framesSeen") or 0) >= 5)
        assert int(browser.eval("document.getElementById('step').textContent") or 0) >= 1 or api_state(url)["episode"] >= 1

        # A person takes over: pause, record, reset, then hold LEFT and step three times.
        browser.key("m")
        browser.key("p")
        wait_until("human and paused", lambda: (s := api_state(url)["settings"])["controller"] == "human" and s["paused"])
        episode = api_state(url)["episode"]
        browser.key("r")
        browser.key("Enter")
        wait_until("recording a new episode", lambda: (s := api_state(url))["recording"] and s["episode"] == episode + 1)
        browser.key("ArrowLeft", up=False)
        wait_until("LEFT held", lambda: api_state(url)["held_action"] == LEFT)
        for _ in range(STEPS):
            browser.key(".")
        browser.key("ArrowLeft", down=False)
        state = wait_until("three steps", lambda: (s := api_state(url))["step"] == STEPS and s["held_action"] == NOOP and s)
        assert state["last_action"] == "LEFT"
        wait_until("the page shows step 3", lambda: browser.eval("document.getElementById('step').textContent") == str(STEPS))

        # The frame is the world model's prediction for LEFT with this seed, and not the one for NOOP.
        shown = decode_png(state["frame"])
        left = predicted_frames(checkpoints["agent"], episode + 1, LEFT, STEPS)
        noop = predicted_frames(checkpoints["agent"], episode + 1, NOOP, STEPS)
        assert np.abs(shown.astype(int) - left[-1].astype(int)).max() <= 1
        assert np.abs(left[-1].astype(int) - noop[-1].astype(int)).mean() > 2

        # Recording off: the episode (real context + the three imagined steps) loads back.
        browser.key("r")
        wait_until("recording saved", lambda: not api_state(url)["recording"])
        store = EpisodeStore(tmp / "records" / "play")
        assert len(store) == 1 and store.game == GAME
        ep = store[0]
        assert list(ep.act[-STEPS:]) == [LEFT] * STEPS and ep.truncated[-1]
        assert np.array_equal(ep.obs[-1], shown)

        # Side by side: the real game beside the world model, with the per-step pixel error.
        browser.key("v")
        wait_until("side by side", lambda: api_state(url)["settings"]["side_by_side"])
        browser.key(".")
        state = wait_until("a side-by-side step", lambda: (s := api_state(url))["pixel_error"] is not None and s)
        assert state["real_frame"] and 0 <= state["pixel_error"] <= 255
        wait_until("real game and error drawn", lambda: browser.eval(
            "!document.getElementById('real-box').hidden && document.getElementById('error-px').textContent !== '-'"))

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        (ARTIFACTS / "play.png").write_bytes(shot)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000
    finally:
        browser.close()


def test_api_rejects_what_is_not_the_game(server: dict[str, Any]) -> None:
    """Only JSON from this host, only known settings, and record names that are not paths."""
    def post(path: str, body: bytes, **headers: str) -> int:
        req = urllib.request.Request(server["url"] + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        try:
            return urllib.request.urlopen(req, timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    assert post("api/settings", b'{"record": "../../etc"}') == 400
    assert post("api/settings", b'{"record": "/tmp/x"}') == 400
    assert post("api/settings", b'{"dataset": "/tmp"}') == 400
    assert post("api/action", b'{"action": 99}') == 400
    assert post("api/settings", b'{"paused": true}', **{"Content-Type": "text/plain"}) == 415
    assert post("api/settings", b'{"paused": true}', Host="evil.example") == 403
    assert post("api/files", b'{}') == 404


def one_line_error(*args: str, cwd: Path) -> str:
    done = subprocess.run(play_command(*args), cwd=cwd, env=play_env(), capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    return errors[0]


def test_missing_and_wrong_checkpoints_are_one_line_errors(checkpoints: dict[str, Path]) -> None:
    tmp = checkpoints["tmp"]
    assert "checkpoint not found" in one_line_error("--agent", str(tmp / "missing.pt"), cwd=tmp)
    assert "not an agent checkpoint" in one_line_error("--agent", str(checkpoints["world_model"]), cwd=tmp)


def test_busy_port_is_a_one_line_error(checkpoints: dict[str, Path]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error("--world-model", str(checkpoints["world_model"]), "--game", GAME, "--params",
                              str(ROOT / "params.yaml"), "--port", str(port), cwd=checkpoints["tmp"])
    assert "already in use" in line


def test_dataset_mode_replays_a_store_frame_by_frame(tmp_path: Path) -> None:
    """Dataset mode (the authors' dataset viewer, src/game/dataset_env.py) shows every stored
    frame in order, episode after episode, with the stored actions and rewards."""
    from diamond.data import Episode
    from diamond.play.session import PlaySession, PlaySettings

    rng = np.random.default_rng(0)
    store = EpisodeStore(tmp_path / "dataset", game=GAME, num_actions=4)
    episodes = [Episode(rng.integers(0, 256, (t + 1, 3, 32, 32), dtype=np.uint8), rng.integers(0, 4, t),
                        np.ones(t, dtype=np.float32), np.zeros(t, dtype=bool), np.eye(t, dtype=bool)[-1]) for t in (3, 2)]
    for ep in episodes:
        store.append(ep)
    session = PlaySession(GAME, tiny_params().env, None, None, torch.device("cpu"), dataset=EpisodeStore(tmp_path / "dataset"),
                          settings=PlaySettings(mode="dataset", controller="human"))
    shown = [session.frame]
    for _ in range(7):
        session.step()
        shown.append(session.frame)
    expected = [*episodes[0].obs, *episodes[1].obs, episodes[0].obs[0]]
    assert all(np.array_equal(a, b) for a, b in zip(shown, expected, strict=True))
    state = session.state()
    assert state["replay"] == {"episode": 0, "episodes": 2} and state["step"] == 0
    session.step()
    assert session.state()["last_action"] == session.names[episodes[0].act[0]] and session.score == 1.0


def test_page_is_self_contained() -> None:
    """The page works offline: no script, style, font or image from the network."""
    from importlib import resources

    page = resources.files("diamond.play").joinpath("page.html").read_text()
    assert "http:" not in page and "https:" not in page and 'src="//' not in page and "@import" not in page


def test_world_model_alone_is_played_by_a_person(checkpoints: dict[str, Path]) -> None:
    from diamond.play.session import PlaySession

    wm = load_world_model(checkpoints["world_model"], torch.device("cpu"))
    session = PlaySession(GAME, tiny_params().env, wm, None, torch.device("cpu"))
    assert session.settings.controller == "human" and session.state(frames=False)["controllers"] == ["human"]
    with pytest.raises(ValueError, match="controller"):
        session.update({"controller": "agent"})
    session.set_action(LEFT)
    session.step()
    assert session.last_action == LEFT and session.state(frames=False)["last_action"] == "LEFT"
    session.update({"denoising_steps": 1, "horizon": 1})  # the sampler and horizon change live
    session.step()  # the horizon of 1 ends the episode: a new one starts
    assert session.dream.sampler.cfg.num_steps == 1 and session.step_count == 0 and session.episode == 1
