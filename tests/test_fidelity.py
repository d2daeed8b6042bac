"""R's held-out report (diamond.world_model.fidelity.classification_report): what sampling from R
gives, against the constant predictors a learning R must beat."""

from __future__ import annotations

import numpy as np
import pytest

from diamond.world_model.fidelity import REWARD_CLASS_NAMES, classification_report

TARGET = np.array([1] * 90 + [2] * 10)  # 90 zero rewards, 10 positive, no negative


def test_a_constant_predictor_at_the_class_frequencies_learns_nothing_beyond_them():
    probs = np.tile([0.0, 0.9, 0.1], (len(TARGET), 1))
    rep = classification_report(probs, TARGET, REWARD_CLASS_NAMES)
    assert rep["sampled_recall"] == {"negative": None, "zero": pytest.approx(0.9), "positive": pytest.approx(0.1)}
    assert rep["sampled_false_rate"]["positive"] == pytest.approx(0.1)  # as often where no reward came
    assert rep["log_loss"] == pytest.approx(rep["log_loss_constant"])
    assert rep["log_loss_constant"] == pytest.approx(-(0.9 * np.log(0.9) + 0.1 * np.log(0.1)))
    assert rep["recall"] == {"negative": None, "zero": 1.0, "positive": 0.0}  # the majority class


def test_a_predictor_that_knows_where_the_rewards_are_beats_the_constant():
    probs = np.where((TARGET == 2)[:, None], [0.0, 0.3, 0.7], [0.0, 0.99, 0.01])
    rep = classification_report(probs, TARGET, REWARD_CLASS_NAMES)
    assert rep["sampled_recall"]["positive"] == pytest.approx(0.7)
    assert rep["sampled_false_rate"]["positive"] == pytest.approx(0.01)
    assert rep["sampled_false_rate"]["negative"] == 0.0
    assert rep["log_loss"] < 0.5 * rep["log_loss_constant"]
    assert rep["recall"]["positive"] == 1.0 and rep["accuracy"] == 1.0
