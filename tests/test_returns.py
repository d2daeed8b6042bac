"""Lambda-returns against hand-computed values, with termination and truncation inside the window."""

from __future__ import annotations

import pytest
import torch

from diamond.agent.returns import lambda_returns


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_hand_computed_with_truncation_and_termination() -> None:
    # gamma = lambda = 0.5. Row A is cut (truncated) after step 1; row B terminates after step 1.
    # Worked backwards by hand, G_t = r_t + g (1 - term_t) ((1 - l) V_{t+1} + l N_t):
    # A: G3 = 1 + .5 * 6 = 4; G2 = 2 + .5 (.5*2 + .5*4) = 3.5; G1 (cut: N = V = 8) = .5 * 8 = 4;
    #    G0 = 1 + .5 (.5*4 + .5*4) = 3
    # B: G3 = .5 * 4 = 2; G2 = .5 (.5*4 + .5*2) = 1.5; G1 (terminal) = 1; G0 = .5 (.5*2 + .5*1) = .75
    rewards = _t([[1, 0, 2, 1], [0, 1, 0, 0]])
    next_values = _t([[4, 8, 2, 6], [2, 10, 4, 4]])
    terminated = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    truncated = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    got = lambda_returns(rewards, next_values, terminated, truncated, gamma=0.5, lambda_=0.5)
    torch.testing.assert_close(got, _t([[3, 4, 3.5, 4], [0.75, 1, 1.5, 2]]))


def test_lambda_zero_is_one_step_td_and_lambda_one_is_monte_carlo() -> None:
    rewards = _t([[1, 2, 3]])
    next_values = _t([[10, 20, 30]])
    no = torch.zeros(1, 3, dtype=torch.bool)
    td = lambda_returns(rewards, next_values, no, no, gamma=0.9, lambda_=0.0)
    torch.testing.assert_close(td, rewards + 0.9 * next_values)
    mc = lambda_returns(rewards, next_values, no, no, gamma=0.9, lambda_=1.0)
    g2 = 3 + 0.9 * 30
    g1 = 2 + 0.9 * g2
    g0 = 1 + 0.9 * g1
    torch.testing.assert_close(mc, _t([[g0, g1, g2]]))


def test_termination_at_last_step_drops_bootstrap() -> None:
    rewards = _t([[0, 1]])
    next_values = _t([[5, 100]])
    terminated = torch.tensor([[False, True]])
    got = lambda_returns(rewards, next_values, terminated, torch.zeros_like(terminated), 1.0, 1.0)
    torch.testing.assert_close(got, _t([[1, 1]]))


def test_mismatched_shapes_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="share one"):
        lambda_returns(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 3), 0.9, 0.9)
