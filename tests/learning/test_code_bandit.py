"""code-bandit: Thompson sampling over the control codes finds a user's code from ratings alone."""

from __future__ import annotations

import numpy as np
import pytest

from flhf_core.learning.code_bandit import CodeBandit


@pytest.mark.parametrize("seed", [0, 1])
def test_a_noiseless_user_is_served_its_best_code_within_a_few_dozen_judgements(seed):
    utilities = np.array(
        [0.10, 0.22, 0.31, 0.18, 0.27, 0.05, 0.12, 0.29, 0.15, 0.20, 0.08, 0.25, 0.14, 0.19, 0.11]
    )
    bandit, rng = CodeBandit.fresh(len(utilities)), np.random.default_rng(seed)
    for _ in range(60):
        arm = bandit.choose(rng)
        bandit.update(arm, float(utilities[arm]))
    assert bandit.best() == int(np.argmax(utilities))
    assert bandit.counts[bandit.best()] >= 10  # it exploits: uniform exploration would give it 4


def test_a_noisy_user_ends_on_a_near_best_code():
    rng = np.random.default_rng(3)
    utilities = np.array([0.30, 0.10, 0.12, 0.28, 0.05])
    bandit = CodeBandit.fresh(len(utilities))
    for _ in range(200):
        arm = bandit.choose(rng)
        bandit.update(arm, float(np.clip(utilities[arm] + rng.normal(0, 0.03), 0, 1)))
    assert utilities[bandit.best()] >= 0.28


def test_a_fresh_bandit_serves_the_first_code_and_tries_every_arm_early():
    bandit, rng = CodeBandit.fresh(4), np.random.default_rng(0)
    assert bandit.best() == 0
    tried = set()
    for _ in range(12):
        arm = bandit.choose(rng)
        tried.add(arm)
        bandit.update(arm, 0.1)
    assert tried == {0, 1, 2, 3}
