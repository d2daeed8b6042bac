"""The Atari 100k environment (paper Appendix, docs/architecture.md §2): the ALE
protocol, the game list, and the collector that writes real episodes."""
