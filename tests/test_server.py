"""The ServerApp's pure helpers: learning-rate schedule, fairness figures, reward summary."""

from __future__ import annotations

import itertools

import pytest

from flhf_core.config import RunConfig
from flhf_core.server import reward_summary, round_learning_rate, user_spread


def test_cosine_schedule_decays_to_a_tenth_and_constant_stays():
    config = RunConfig(num_server_rounds=6, learning_rate=1e-3, lr_schedule="cosine")
    rates = [round_learning_rate(config, r) for r in range(1, 7)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert round_learning_rate(config.replace(**{"lr-schedule": "constant"}), 5) == 1e-3


def test_user_spread_reports_mean_worst_and_spread():
    users = {
        0: {"reward": 0.1, "reward-length": 0.5, "win-rate": 0.4},
        1: {"reward": 0.3, "reward-length": 0.9, "win-rate": 0.8},
    }
    spread = user_spread(users)
    assert spread["reward"] == pytest.approx(0.2) and spread["reward-worst"] == 0.1
    assert spread["reward-best"] == 0.3 and spread["reward-std"] == pytest.approx(0.1)
    assert spread["reward-length"] == pytest.approx(0.7) and spread["win-rate"] == pytest.approx(0.6)
    assert user_spread({}) == {}


def test_reward_summary_compares_feedback_rounds_with_the_last_supervised_round():
    rows = [
        {"round": 1, "phase": "sft", "reward": 0.10, "reward-worst": 0.05},
        {"round": 2, "phase": "sft", "reward": 0.12, "reward-worst": 0.06},
        {"round": 3, "phase": "feedback", "reward": 0.15, "reward-worst": 0.09, "win-rate": 0.7},
    ]
    summary = reward_summary(rows, sft_rounds=2)
    assert summary["reward-after-sft"] == 0.12 and summary["reward"] == 0.15
    assert summary["reward-gain-from-feedback"] == pytest.approx(0.03)
    assert "reward-after-sft" not in reward_summary(rows[:2], sft_rounds=2)  # no feedback rounds
