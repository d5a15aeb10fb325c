"""The server's side of federated and clustered reward models (issue 13), as pure math."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flhf_core.reward_federation import average_reward_models, balanced_assignment


def test_the_average_is_weighted_by_judgements_and_skips_users_who_judged_nothing():
    a = {"encoder.w": np.array([1.0, 2.0]), "head.w": np.array([10.0])}
    b = {"encoder.w": np.array([3.0, 6.0]), "head.w": np.array([30.0])}
    c = {"encoder.w": np.array([100.0, 100.0]), "head.w": np.array([100.0])}  # judged nothing
    average = average_reward_models([a, b, c], [1, 3, 0])
    np.testing.assert_allclose(average["encoder.w"], [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6])
    np.testing.assert_allclose(average["head.w"], [0.25 * 10 + 0.75 * 30])
    assert set(average_reward_models([a, b], [1, 1], personal_prefix="head.")) == {"encoder.w"}
    assert average_reward_models([a, c], [0, 0]) is None
    with pytest.raises(ValueError, match="non-negative"):
        average_reward_models([a], [-1])


def test_clusters_recover_two_kinds_of_users_and_stay_balanced():
    # users 0-3 are fitted by cluster 0's model, users 4-7 by cluster 1's
    losses = {u: [0.2, 0.9] if u < 4 else [0.8, 0.1] for u in range(8)}
    assert balanced_assignment(losses, seed=1) == {u: int(u >= 4) for u in range(8)}


def test_a_popular_cluster_takes_only_its_share_and_the_same_seed_gives_the_same_groups():
    rng = np.random.default_rng(0)
    losses = {u: [0.1, *rng.uniform(0.2, 1.0, size=2)] for u in range(7)}  # cluster 0 fits everyone
    groups = balanced_assignment(losses, seed=3)
    sizes = [sum(k == c for k in groups.values()) for c in range(3)]
    assert sorted(groups) == list(range(7)) and max(sizes) <= math.ceil(7 / 3) and sizes[0] == 3
    assert balanced_assignment(losses, seed=3) == groups
    assert any(balanced_assignment(losses, seed=s) != groups for s in range(4, 20))  # the seed orders users
    with pytest.raises(ValueError, match="one loss per cluster"):
        balanced_assignment({0: [0.1, 0.2], 1: [0.3]}, seed=0)
