"""Play and watch inside the world model: the session behind `python -m stages.play`.

The authors' play mode (src/play.py, src/game/play_env.py, src/game/game.py) is a pygame window
in which the agent or a person plays inside the world model, the real game can be swapped in, and
a dataset can be replayed. Here the same session is driven by a small JSON API (diamond/play/server.py)
and drawn by a browser, so it runs without a display.

Every episode starts from real frames: the real game (test settings) is reset and plays
L - 1 seeded random actions, which gives the L frames and L - 1 actions the denoiser conditions on
(docs/architecture.md §3.4; the authors start from dataset segments instead). The real game then
goes on from that state, so side by side the world model and the real game start from the same
frames and are fed the same actions. Episode k of a session seeded s plays with torch seeded
`derived_seed(s, k)`, so a run of key presses is reproducible.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ale_py
import numpy as np
import torch

from diamond.agent.imagination import ImaginationEnv
from diamond.config import EnvConfig
from diamond.data import Episode, EpisodeStore
from diamond.data.frames import to_float, to_uint8
from diamond.env.atari import make_env, rom_id
from diamond.env.collector import chw
from diamond.models.actor_critic import ActorCritic
from diamond.seeds import derived_seed
from diamond.world_model.model import WorldModel, make_sampler

MODES = ("world_model", "real_test", "real_train", "dataset")
CONTROLLERS = ("agent", "human")
MAX_DENOISING_STEPS = 10  # the range the page offers (1 to 10), as the authors' play menu
MAX_HORIZON = 10_000
# Browser KeyboardEvent.code of each part of an ALE action name (the authors' keymap uses the
# arrows and space too, src/game/keymap.py).
KEY_OF_PART = {"UP": "ArrowUp", "DOWN": "ArrowDown", "LEFT": "ArrowLeft", "RIGHT": "ArrowRight", "FIRE": "Space"}
RECORD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def action_names(game: str) -> list[str]:
    """Names of the game's minimal action set, in the order of the action indices (diamond.env.atari)."""
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.loadROM(ale_py.roms.get_rom_path(rom_id(game)))
    return [a.name for a in ale.getMinimalActionSet()]


def key_map(names: list[str]) -> dict[str, list[str]]:
    """Action name -> the keys held together to play it ("UPFIRE" -> ArrowUp + Space; NOOP: none)."""
    return {name: [KEY_OF_PART[p] for p in re.findall("UP|DOWN|LEFT|RIGHT|FIRE", name)] for name in names}


def record_name(name: object) -> str:
    """A record name from the client, which may only name a folder inside the record directory."""
    if not isinstance(name, str) or not RECORD_NAME.fullmatch(name):
        raise ValueError("record: a name of letters, digits, '_' and '-' (at most 64), not a path")
    return name


def png_base64(frame: np.ndarray) -> str:
    """CHW uint8 -> base64 PNG at the native size (the page upscales it)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame.transpose(1, 2, 0))).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class RealStart:
    """L real frames (uint8 (L, 3, H, W)), the L - 1 actions between them, and the game after them."""

    obs: np.ndarray
    act: np.ndarray
    env: Any


class RealGame:
    """The real game of one setting (test or train), loaded once: a fresh ROM load takes a quarter
    of a second, so each episode starts from a snapshot of the loaded game instead."""

    def __init__(self, game: str, env_cfg: EnvConfig, seed: int, train: bool) -> None:
        self.env = make_env(game, seed, train=train, config=env_cfg)
        self.snapshot = self.env.get_state()

    def start(self, seed: int, episode: int, context: int) -> RealStart:
        """Episode `episode`'s start: the loaded game reset and played `context - 1` seeded random
        steps (the same for the same seed and episode, whatever was played before)."""
        self.env.set_state(self.snapshot)
        frames = [chw(self.env.reset()[0])]
        rng = np.random.default_rng(derived_seed(seed, episode, 1))
        actions = rng.integers(0, self.env.action_space.n, size=context - 1)
        for a in actions:
            frames.append(chw(self.env.step(int(a))[0]))
        return RealStart(np.stack(frames), actions.astype(np.int64), self.env)


class StartedDream(ImaginationEnv):
    """`ImaginationEnv` with one row whose (re)starts are the given real frames, not dataset segments."""

    def __init__(self, wm: WorldModel, horizon: int, device: torch.device) -> None:
        super().__init__(wm.sampler, wm.reward_end, segments=None, num_conditioning_frames=wm.cfg.denoiser.num_conditioning_frames,  # type: ignore[arg-type]
                         batch_size=1, horizon=horizon, device=device)
        self.start: RealStart | None = None

    def _draw(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.start is not None
        obs = to_float(self.start.obs, device)[None].expand(n, -1, -1, -1, -1)
        act = torch.as_tensor(self.start.act, device=device)[None].expand(n, -1)
        return obs, act, torch.ones(n, obs.shape[1], dtype=torch.bool, device=device)


@dataclass
class Recording:
    """The episode being recorded: frames, then per step action, reward and end flags."""

    store: EpisodeStore
    obs: list[np.ndarray] = field(default_factory=list)
    act: list[int] = field(default_factory=list)
    rew: list[float] = field(default_factory=list)
    terminated: list[bool] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)

    def begin(self, obs: np.ndarray, act: np.ndarray) -> None:
        """Start an episode with its real context: frames obs (L, ...) and the L - 1 actions between them."""
        self.obs, self.act = list(obs), [int(a) for a in act]
        self.rew, self.terminated, self.truncated = [0.0] * len(act), [False] * len(act), [False] * len(act)

    def add(self, action: int, frame: np.ndarray, reward: float, terminated: bool, truncated: bool) -> None:
        self.obs.append(frame)
        self.act.append(action)
        self.rew.append(reward)
        self.terminated.append(terminated)
        self.truncated.append(truncated)

    def flush(self, cut: bool) -> int | None:
        """Append the episode to the store (`cut`: it did not end, so it is marked truncated)."""
        if not self.act:
            return None
        truncated = list(self.truncated)
        if cut and not (self.terminated[-1] or truncated[-1]):
            truncated[-1] = True
        ep = Episode(np.stack(self.obs), np.array(self.act, dtype=np.int64), np.array(self.rew, dtype=np.float32),
                     np.array(self.terminated, dtype=bool), np.array(truncated, dtype=bool))
        index = self.store.append(ep)
        self.obs, self.act, self.rew, self.terminated, self.truncated = [], [], [], [], []
        return index


@dataclass
class PlaySettings:
    """What the page can change (everything the JSON API accepts besides actions)."""

    mode: str = "world_model"
    controller: str = "agent"
    paused: bool = False
    horizon: int = 1000
    denoising_steps: int = 3
    side_by_side: bool = False
    fps: float = 15.0  # target rate; 0 = as fast as the CPU goes


class PlaySession:
    """One player's game: the world model, the real game or a dataset, under the agent or a person.

    Not thread-safe by itself: the server holds a lock around every call.
    """

    def __init__(self, game: str, env_cfg: EnvConfig, wm: WorldModel | None, ac: ActorCritic | None,
                 device: torch.device, seed: int = 0, dataset: EpisodeStore | None = None,
                 record_dir: Path | None = None, settings: PlaySettings | None = None) -> None:
        self.game, self.env_cfg, self.wm, self.ac, self.device, self.seed = game, env_cfg, wm, ac, device, seed
        self.dataset, self.record_dir = dataset, record_dir
        self.names = action_names(game)
        self.settings = settings or PlaySettings(
            mode="world_model" if wm is not None else "real_test", controller="agent" if ac is not None else "human")
        if wm is not None:
            self.settings.denoising_steps = wm.cfg.sampler.num_steps
        self.context = wm.cfg.denoiser.num_conditioning_frames if wm is not None else 4
        self.dream = StartedDream(wm, self.settings.horizon, device) if wm is not None else None
        self.held_action = 0
        self.episode = -1
        self.real_games = {train: RealGame(game, env_cfg, seed, train) for train in (False, True)}
        self.recording: Recording | None = None
        self.recorded: list[str] = []
        self._rates: list[float] = []
        self.reset()

    # -- settings -------------------------------------------------------------------------------

    def available_modes(self) -> list[str]:
        modes = ["real_test", "real_train"]
        return (["world_model"] if self.wm is not None else []) + modes + (["dataset"] if self.dataset is not None else [])

    def formulations(self) -> list[str]:
        """The sampler formulations the checkpoint can run: the one its denoiser was trained for
        (an EDM denoiser has no noise-prediction head, and a DDPM one no preconditioned output)."""
        return [self.wm.cfg.denoiser.formulation] if self.wm is not None else []

    def update(self, changes: dict[str, Any]) -> None:
        """Apply settings from the page; ValueError on an unknown key or a value out of range."""
        s = self.settings
        restart = False
        for key, value in changes.items():
            if key == "mode":
                if value not in self.available_modes():
                    raise ValueError(f"mode: {value!r} is not one of {self.available_modes()}")
                restart |= value != s.mode
                s.mode = value
            elif key == "controller":
                if value not in CONTROLLERS or (value == "agent" and self.ac is None):
                    raise ValueError(f"controller: {value!r} is not available")
                s.controller = value
            elif key in ("paused", "side_by_side"):
                if not isinstance(value, bool):
                    raise ValueError(f"{key}: true or false")
                restart |= key == "side_by_side" and value != s.side_by_side
                setattr(s, key, value)
            elif key == "horizon":
                s.horizon = _int_in(key, value, 1, MAX_HORIZON)
                if self.dream is not None:
                    self.dream.horizon = s.horizon
            elif key == "denoising_steps":
                s.denoising_steps = _int_in(key, value, 1, MAX_DENOISING_STEPS)
                self._set_sampler()
            elif key == "fps":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 240:
                    raise ValueError("fps: a number from 0 (as fast as possible) to 240")
                s.fps = float(value)
            elif key == "record":
                self._set_recording(value)
            else:
                raise ValueError(f"unknown setting {key!r}")
        if restart:
            self.reset()

    def _set_sampler(self) -> None:
        if self.wm is None or self.dream is None:
            return
        cfg = dataclasses.replace(self.wm.cfg.sampler, num_steps=self.settings.denoising_steps)
        self.dream.sampler = make_sampler(self.wm.denoiser, dataclasses.replace(self.wm.cfg, sampler=cfg))

    def _set_recording(self, name: object) -> None:
        if name is None:
            if self.recording is not None:
                self.recording.flush(cut=True)
            self.recording = None
            return
        if self.record_dir is None:
            raise ValueError("record: the server was started without --record-dir")
        if self.settings.mode == "dataset":
            raise ValueError("record: nothing to record while replaying a dataset")
        root = self.record_dir / record_name(name)
        if self.recording is not None:
            self.recording.flush(cut=True)
        self.recording = Recording(EpisodeStore(root, game=self.game, num_actions=len(self.names)))
        self.recorded.append(str(root))
        self.recording.begin(self.frame[None], np.zeros(0, dtype=np.int64))

    def set_action(self, action: object) -> None:
        if isinstance(action, bool) or not isinstance(action, int) or not 0 <= action < len(self.names):
            raise ValueError(f"action: an integer in 0..{len(self.names) - 1}")
        self.held_action = action

    # -- playing --------------------------------------------------------------------------------

    def reset(self) -> None:
        """A new episode (or, replaying a dataset, the start of the current episode)."""
        if self.recording is not None:
            self.recording.flush(cut=True)
        self.step_count, self.score, self.pixel_error, self.real_frame = 0, 0.0, None, None
        self.last_action: int | None = None
        if self.settings.mode == "dataset":
            self.replay_index = getattr(self, "replay_index", 0)
            self.frame = self.dataset[self.replay_index].obs[0]  # type: ignore[index]
            return
        self.episode += 1
        torch.manual_seed(derived_seed(self.seed, self.episode))
        train = self.settings.mode == "real_train"
        start = self.real_games[train].start(self.seed, self.episode, self.context)
        self.real = start.env
        self.frame = start.obs[-1]
        if self.settings.mode == "world_model":
            assert self.dream is not None
            self.dream.start = start
            self.dream.reset()
            if self.settings.side_by_side:
                self.real_frame = start.obs[-1]
        if self.ac is not None:
            self.agent_state = self.ac.burn_in(to_float(start.obs[:-1], self.device)[None])
        if self.recording is not None:
            self.recording.begin(start.obs, start.act)

    def next_episode(self, delta: int) -> None:
        """Dataset mode: move to another stored episode."""
        if self.settings.mode != "dataset" or self.dataset is None:
            raise ValueError("episode: only when replaying a dataset")
        self.replay_index = (self.replay_index + delta) % len(self.dataset)
        self.reset()

    @torch.no_grad()
    def _choose(self) -> int:
        if self.settings.controller == "human" or self.ac is None:
            return self.held_action
        logits, _, self.agent_state = self.ac(to_float(self.frame, self.device)[None], self.agent_state)
        return int(torch.distributions.Categorical(logits=logits[0]).sample())

    @torch.no_grad()
    def step(self) -> None:
        """One step of the current mode under the current controller (the authors' PlayEnv.step)."""
        began = time.perf_counter()
        if self.settings.mode == "dataset":
            self._replay_step()
        else:
            action = self._choose()
            reward, terminated, truncated = (self._dream_step if self.settings.mode == "world_model" else self._real_step)(action)
            self.last_action = action
            self.step_count += 1
            self.score += reward
            if self.recording is not None:
                self.recording.add(action, self.frame, reward, terminated, truncated)
            if terminated or truncated:
                self.reset()
        self._rates = (self._rates + [time.perf_counter() - began])[-30:]

    def _dream_step(self, action: int) -> tuple[float, bool, bool]:
        assert self.dream is not None
        out = self.dream.step(torch.tensor([action], device=self.device))
        self.frame = to_uint8(out.final_obs[0])
        terminated, truncated = bool(out.terminated[0]), bool(out.truncated[0])
        if self.settings.side_by_side:
            real, _, real_end, real_cut, _ = self.real.step(action)
            self.real_frame = chw(real)
            # Mean absolute error on the 0-255 pixel scale, per step (no accumulation).
            self.pixel_error = float(np.abs(self.real_frame.astype(np.int16) - self.frame.astype(np.int16)).mean())
            truncated |= (real_end or real_cut) and not terminated
        return float(out.reward[0]), terminated, truncated

    def _real_step(self, action: int) -> tuple[float, bool, bool]:
        obs, reward, terminated, truncated, _ = self.real.step(action)
        self.frame = chw(obs)
        return float(reward), bool(terminated), bool(truncated)

    def _replay_step(self) -> None:
        assert self.dataset is not None
        ep = self.dataset[self.replay_index]
        if self.step_count >= len(ep):
            self.replay_index = (self.replay_index + 1) % len(self.dataset)
            self.reset()
            return
        self.last_action = int(ep.act[self.step_count])
        self.score += float(ep.rew[self.step_count])
        self.step_count += 1
        self.frame = ep.obs[self.step_count]

    def compute_rate(self) -> float | None:
        """Steps per second the CPU reaches (the mean over the last 30 steps' compute times)."""
        return len(self._rates) / sum(self._rates) if self._rates else None

    def close(self) -> None:
        if self.recording is not None:
            self.recording.flush(cut=True)
            self.recording = None

    # -- what the page shows --------------------------------------------------------------------

    def state(self, frames: bool = True) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {
            "game": self.game, "episode": self.episode, "step": self.step_count, "score": self.score,
            "settings": dataclasses.asdict(s), "modes": self.available_modes(),
            "controllers": [c for c in CONTROLLERS if c != "agent" or self.ac is not None],
            "formulations": self.formulations(), "actions": self.names, "key_map": key_map(self.names),
            "held_action": self.held_action,
            "last_action": None if self.last_action is None else self.names[self.last_action],
            "pixel_error": self.pixel_error, "compute_fps": self.compute_rate(),
            "recording": self.recording is not None, "recorded": [Path(r).name for r in self.recorded],
            "replay": {"episode": self.replay_index, "episodes": len(self.dataset)} if s.mode == "dataset" and self.dataset else None,
        }
        if frames:
            out["frame"] = png_base64(self.frame)
            out["real_frame"] = png_base64(self.real_frame) if self.real_frame is not None else None
        return out


def _int_in(key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key}: an integer from {low} to {high}")
    return value
