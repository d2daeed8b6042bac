"""Atari 100k environment (docs/architecture.md §2).

`make_env(game, seed, train, config)` gives a gymnasium environment over raw ALE frames
(frameskip 1 at the ALE level, no sticky actions, minimal action set) with the Atari 100k
preprocessing done here in one place: 1..max_noops random no-ops at reset, action repeat with a
max over the last two raw frames, an area resize to obs_size x obs_size RGB (the interpolation of
gymnasium's `AtariPreprocessing`), termination on life loss in training only, truncation at
`max_episode_frames` raw frames, raw rewards.

It drives the ALE interface directly rather than stacking gymnasium wrappers: only the two frames
that are max-pooled are copied out of the emulator, which keeps collection and evaluation fast.

In training, an episode that ended on a life loss (game not over) continues the same game at the
next `reset()`, as the usual episodic-life protocol does, so the data are not biased towards the
start of games. `info["game_score"]` is the raw score of the whole game so far (all lives).
"""

from __future__ import annotations

import functools
import pickle
import re
from typing import Any

import ale_py
import cv2
import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding

from diamond.config import LIFE_COUNTERS, ConfigError, EnvConfig, check_choice, check_section
from diamond.env.games import ATARI_100K_GAMES

gymnasium.register_envs(ale_py)



def rom_id(game: str) -> str:
    """ALE's ROM id of a short game name: "MsPacman" -> "ms_pacman"."""
    check_game(game)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", game).lower()


def check_game(game: str) -> None:
    if game not in ATARI_100K_GAMES:
        raise ConfigError(f"unknown game {game!r}; allowed: {', '.join(ATARI_100K_GAMES)}")


def check_env_config(config: EnvConfig) -> None:
    """The env section's ranges (diamond/config.py RANGE_RULES), for callers that build an
    EnvConfig themselves; params files are checked when they load."""
    check_section(config, "env")
    check_choice("env.life_counter", config.life_counter, LIFE_COUNTERS)


@functools.lru_cache(maxsize=None)
def num_actions(game: str) -> int:
    """Size of the game's minimal action set."""
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.loadROM(ale_py.roms.get_rom_path(rom_id(game)))
    return len(ale.getMinimalActionSet())


class AtariEnv(gymnasium.Env):
    """One Atari 100k game; observations uint8 (obs_size, obs_size, 3) HWC."""

    metadata = {"render_modes": []}

    def __init__(self, game: str, seed: int, train: bool, config: EnvConfig) -> None:
        check_game(game)
        check_env_config(config)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed: {seed!r} must be a non-negative integer")
        self.game, self.train, self.config = game, train, config
        self._rom = ale_py.roms.get_rom_path(rom_id(game))
        self.ale = ale_py.ALEInterface()
        self.ale.setLoggerMode(ale_py.LoggerMode.Error)
        self.ale.setFloat("repeat_action_probability", 0.0)  # no sticky actions
        # ALE's own truncation counts raw frames since the real reset, no-ops included.
        self.ale.setInt("max_num_frames_per_episode", config.max_episode_frames)
        self._load(seed)  # the first reset() without a seed starts from this seed
        self._action_set = self.ale.getMinimalActionSet()
        h, w = self.ale.getScreenDims()
        self._screen = np.empty((h, w, 3), dtype=np.uint8)
        self._prev_screen = np.empty((h, w, 3), dtype=np.uint8)
        size = config.obs_size
        self.observation_space = spaces.Box(0, 255, (size, size, 3), dtype=np.uint8)
        self.action_space = spaces.Discrete(len(self._action_set))
        self._continue_game = False  # training: the last episode ended on a life loss
        self._lives = 0
        self._game_score = 0.0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if self._continue_game and seed is None:
            # Next life of the same game: no real reset, no no-ops.
            self._continue_game = False
            return self._observation(), self._info(life_loss=False, noops=0)
        self._continue_game = False
        if seed is not None:
            self._load(seed)
        self.ale.reset_game()
        noops = int(self._noop_rng.integers(1, self.config.max_noops + 1)) if self.config.max_noops else 0
        for _ in range(noops):
            self.ale.act(self._action_set[0])
            if self.ale.game_over(with_truncation=True):
                self.ale.reset_game()
        self.ale.getScreenRGB(self._screen)
        self._lives = self.ale.lives()
        self._game_score = 0.0
        return self._observation(), self._info(life_loss=False, noops=noops)

    def _load(self, seed: int) -> None:
        """Seed the emulator and the no-op generator, then (re)load the ROM.

        The seeds are derived as gymnasium's ALE environment derives them, so that the same seed
        gives the same no-ops and frames as `gym.make("ALE/...")` + `AtariPreprocessing`.
        """
        np_seed, ale_seed = np.random.SeedSequence(seed).generate_state(n_words=2)
        self._noop_rng, _ = seeding.np_random(int(np_seed))
        self.ale.setInt("random_seed", int(ale_seed.astype(np.int32)))
        self.ale.loadROM(self._rom)  # applies the settings above

    def step(self, action: int):
        if not 0 <= int(action) < len(self._action_set):
            raise ValueError(f"action {action!r} is not in 0..{len(self._action_set) - 1}")
        ale_action = self._action_set[int(action)]
        skip = self.config.frame_skip
        reward = 0.0
        pooled = False
        for i in range(skip):
            reward += self.ale.act(ale_action)
            if i == skip - 1 or self.ale.game_over(with_truncation=True):
                self.ale.getScreenRGB(self._screen)
                break
            if i == skip - 2:
                self.ale.getScreenRGB(self._prev_screen)
                pooled = True
        if pooled:
            # Max over the last two raw frames removes the flicker of sprites drawn every other frame.
            np.maximum(self._screen, self._prev_screen, out=self._screen)
        lives = self.ale.lives()
        life_loss = lives < self._lives
        if life_loss or self.config.life_counter == "every_step":
            # "decreases_only" (official src/envs/atari_preprocessing.py:76-78) keeps the counter
            # below an extra life, so the next loss goes unseen (row P8, docs/official-parity.md).
            self._lives = lives
        game_over = self.ale.game_over(with_truncation=False)
        terminated = game_over or (self.train and life_loss)
        truncated = self.ale.game_truncated() and not terminated
        self._continue_game = self.train and terminated and not game_over and not truncated
        self._game_score += reward
        return self._observation(), float(reward), terminated, truncated, self._info(life_loss=life_loss)

    def _observation(self) -> np.ndarray:
        size = self.config.obs_size
        return cv2.resize(self._screen, (size, size), interpolation=cv2.INTER_AREA)

    def _info(self, life_loss: bool, noops: int | None = None) -> dict[str, Any]:
        info: dict[str, Any] = {
            "lives": self._lives,
            "life_loss": life_loss,
            "game_score": self._game_score,
            "game_over": self.ale.game_over(with_truncation=True),
            "episode_frame_number": self.ale.getEpisodeFrameNumber(),
        }
        if noops is not None:
            info["noops"] = noops
        return info

    def get_state(self) -> dict[str, Any]:
        """A snapshot from which `set_state` continues this environment exactly: the emulator with
        its random state (and episode frame count), the no-op generator and the episode flags."""
        return {
            "ale": pickle.dumps(self.ale.cloneState(include_rng=True)),
            "noop_rng": self._noop_rng.bit_generator.state,
            "screen": self._screen.copy(),
            "continue_game": self._continue_game,
            "lives": self._lives,
            "game_score": self._game_score,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.ale.restoreState(pickle.loads(state["ale"]))
        self._noop_rng.bit_generator.state = state["noop_rng"]
        self._screen[...] = state["screen"]
        self._continue_game = bool(state["continue_game"])
        self._lives = int(state["lives"])
        self._game_score = float(state["game_score"])

    def close(self) -> None:
        self.ale = None  # frees the emulator; a closed env cannot step


def make_env(game: str, seed: int, train: bool, config: EnvConfig) -> gymnasium.Env:
    """The Atari 100k environment of `game`; its first `reset()` is seeded with `seed`."""
    return AtariEnv(game, seed, train, config)
