"""The diffusion world model (paper §2-3): the EDM denoiser and its samplers (EDM, DDPM),
its training loop, the fidelity metrics and the world-model study."""
