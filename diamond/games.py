"""The 26 games of Atari 100k (Kaiser et al. 2020; the DIAMOND paper's Table 1), by the short
names used in the reference score files. Its own module so that diamond.config checks game names
without importing diamond.env (the emulator): the benchmarks load params on a machine with torch
alone."""

from __future__ import annotations

ATARI_100K_GAMES: tuple[str, ...] = (
    "Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
    "ChopperCommand", "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero",
    "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert",
    "RoadRunner", "Seaquest", "UpNDown",
)
