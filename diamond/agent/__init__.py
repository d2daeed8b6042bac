"""The agent (paper §3, Appendix D): imagination, λ-returns, the actor-critic's losses and
policy, the training loop of train-agent, evaluation and the agent checkpoint."""
