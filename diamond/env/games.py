"""The Atari 100k benchmark's names: its 26 games and the published methods the tables compare
with (docs/architecture.md §2). Its own module, so that the config checks names when params
load without importing the emulator (diamond/env/atari.py imports the config)."""

from __future__ import annotations

# The 26 games of Atari 100k, by the short names used in the reference score files.
ATARI_100K_GAMES: tuple[str, ...] = (
    "Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
    "ChopperCommand", "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero",
    "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert",
    "RoadRunner", "Seaquest", "UpNDown",
)

# Published methods with per-run scores in diamond/results/reference_data/ (diamond/results/scores.py reads them).
REFERENCE_METHODS: tuple[str, ...] = ("DIAMOND", "IRIS", "SimPLe", "SPR", "DrQ-eps", "EfficientZero", "CURL")
