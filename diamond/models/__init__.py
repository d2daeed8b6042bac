"""The networks (paper §3, Appendix C; official src/models/): the denoiser's U-Net, the
reward/termination model R, the actor-critic, and the blocks they share."""
