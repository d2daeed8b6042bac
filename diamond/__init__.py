"""DIAMOND: a diffusion world model agent for Atari 100k (Alonso et al., NeurIPS 2024)."""
