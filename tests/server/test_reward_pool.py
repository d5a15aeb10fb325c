"""The server's side of federated and clustered reward models (issue 13), as pure math."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flhf_core.server.reward_pool import RewardModelPool, average_reward_models, balanced_assignment


def test_the_average_is_weighted_by_judgements_and_skips_users_who_judged_nothing():
    a = {"encoder.w": np.array([1.0, 2.0]), "head.w": np.array([10.0])}
    b = {"encoder.w": np.array([3.0, 6.0]), "head.w": np.array([30.0])}
    c = {"encoder.w": np.array([100.0, 100.0]), "head.w": np.array([100.0])}  # judged nothing
    average = average_reward_models([a, b, c], [1, 3, 0])
    np.testing.assert_allclose(average["encoder.w"], [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6])
    np.testing.assert_allclose(average["head.w"], [0.25 * 10 + 0.75 * 30])
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


def model_of(value: float) -> dict[str, np.ndarray]:
    return {"encoder.w": np.full(2, value), "head.w": np.full(1, value)}


def test_the_first_assignment_is_balanced_and_drawn_from_the_seed():
    pool = RewardModelPool(clusters=2, seed=5)
    pool.assign([3, 0, 2, 1, 4])
    sizes = sorted(list(pool.assignment.values()).count(k) for k in (0, 1))
    assert sizes == [2, 3]
    again = RewardModelPool(clusters=2, seed=5)
    again.assign([0, 1, 2, 3, 4])
    assert again.assignment == pool.assignment  # the same seed, whatever the order users came in
    others = [RewardModelPool(clusters=2, seed=s) for s in range(6)]
    for other in others:
        other.assign(range(5))
    assert len({tuple(sorted(o.assignment.items())) for o in others}) > 1  # the seed matters
    before = dict(pool.assignment)
    smaller = min((0, 1), key=lambda k: (list(before.values()).count(k), k))
    pool.assign([4, 9])  # a newcomer joins the smaller cluster; the others stay
    assert pool.assignment == {**before, 9: smaller}


def test_each_cluster_averages_its_own_users_by_their_judgements():
    pool = RewardModelPool(clusters=2, seed=0)
    pool.assignment = {0: 0, 1: 0, 2: 1, 3: 1}
    models = {0: model_of(1.0), 1: model_of(3.0), 2: model_of(10.0), 3: model_of(20.0)}
    figures = pool.update(1, models, judgements={0: 1, 1: 3, 2: 2, 3: 0}, losses={})
    np.testing.assert_allclose(pool.models[0]["encoder.w"], 0.25 * 1 + 0.75 * 3)
    np.testing.assert_allclose(pool.models[1]["head.w"], 10.0)  # user 3 judged nothing
    assert figures == {"reward-model-clusters-changed": 0.0}  # nobody reported losses yet
    # a round in which cluster 1's users judged nothing: it keeps its model
    pool.update(2, {0: model_of(5.0), 2: model_of(99.0)}, judgements={0: 4, 2: 0}, losses={})
    np.testing.assert_allclose(pool.models[1]["encoder.w"], 10.0)
    np.testing.assert_allclose(pool.models[0]["encoder.w"], 5.0)


def test_nobody_judged_yet_means_no_reward_model_and_federated_is_one_cluster():
    pool = RewardModelPool(clusters=1, seed=0)
    pool.update(1, {0: model_of(1.0), 1: model_of(2.0)}, judgements={0: 0, 1: 0}, losses={})
    assert pool.models == [] and pool.assignment == {0: 0, 1: 0}
    pool.update(2, {0: model_of(1.0), 1: model_of(2.0)}, judgements={0: 1, 1: 1}, losses={})
    np.testing.assert_allclose(pool.models[0]["encoder.w"], 1.5)  # everyone's average


def test_users_move_to_the_cluster_whose_model_fits_their_judgements():
    pool = RewardModelPool(clusters=2, seed=0)
    pool.assignment = {0: 0, 1: 0, 2: 1, 3: 1}
    models = {u: model_of(float(u)) for u in range(4)}
    # users 1 and 2 are fitted better by the other cluster's model
    losses = {0: [0.1, 0.9], 1: [0.8, 0.2], 2: [0.1, 0.7], 3: [0.9, 0.3]}
    figures = pool.update(1, models, judgements=dict.fromkeys(range(4), 2), losses=losses)
    assert pool.assignment == {0: 0, 1: 1, 2: 0, 3: 1}
    assert figures == {"reward-model-clusters-changed": 2.0}
    # the clusters' models were averaged before the move, over the old members
    np.testing.assert_allclose(pool.models[0]["encoder.w"], 0.5)
    # a user that reported no losses (or the wrong number) keeps its cluster
    pool.update(2, models, judgements=dict.fromkeys(range(4), 2), losses={0: [0.9, 0.1], 1: [0.5]})
    assert pool.assignment[1] == 1
