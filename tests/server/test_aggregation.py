"""Reward-aware client weights: pure math, and the strategy's distrust of reports."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import MessageType, MetricRecord
from test_strategy import FakeGrid, global_arrays, reply_to

from flhf_core.server.aggregation import average_metrics, cap_shares, client_weights, weighting_counts
from flhf_core.server.strategy import FeedbackFedAvg

COUNTS = [10, 40, 25, 25]
REWARDS = [0.2, 0.5, 0.1, 0.35]


@pytest.mark.parametrize("mode", ["none", "linear", "softmax", "gain"])
@pytest.mark.parametrize("cap", [1.0, 0.4, 0.3])
def test_weights_sum_to_one_and_respect_the_cap(mode, cap):
    weights = client_weights(COUNTS, mode, REWARDS, [0.1] * 4, temperature=0.1, max_weight=cap)
    assert sum(weights) == pytest.approx(1.0)
    assert max(weights) <= cap + 1e-9 and min(weights) >= 0


def test_none_is_fedavg_and_linear_is_reward_times_examples():
    assert client_weights(COUNTS) == pytest.approx([n / 100 for n in COUNTS])
    linear = client_weights(COUNTS, "linear", REWARDS)
    raw = [n * r for n, r in zip(COUNTS, REWARDS, strict=True)]
    assert linear == pytest.approx([x / sum(raw) for x in raw])


def test_softmax_is_monotone_in_reward_and_a_negative_temperature_favours_the_worst():
    counts = [10] * 4
    warm = client_weights(counts, "softmax", REWARDS, temperature=0.1)
    assert np.argsort(warm).tolist() == np.argsort(REWARDS).tolist()
    for better in np.linspace(0.0, 1.0, 11):  # raising one reward raises its weight
        assert (
            client_weights(counts, "softmax", [better, 0.3, 0.3, 0.3], temperature=0.1)[0]
            >= client_weights(counts, "softmax", [better - 0.05, 0.3, 0.3, 0.3], temperature=0.1)[0]
        )
    cold = client_weights(counts, "softmax", REWARDS, temperature=-0.1)
    assert np.argmax(cold) == np.argmin(REWARDS)


def test_gain_uses_improvement_and_falls_back_when_nobody_improved():
    gains = client_weights([10, 10, 10], "gain", [0.3, 0.3, 0.3], [0.1, 0.2, 0.4])
    assert gains == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert client_weights([10, 30], "gain", [0.1, 0.1], [0.2, 0.3]) == pytest.approx([0.25, 0.75])


def test_cap_edges():
    assert cap_shares([0.7, 0.2, 0.1], 0.5) == pytest.approx([0.5, 0.5 * 2 / 3, 0.5 / 3])
    assert cap_shares([0.7, 0.2, 0.1], 0.2) == pytest.approx([1 / 3] * 3)  # cap below 1/n: equal shares
    assert cap_shares([1.0], 0.1) == [1.0]  # one valid client
    assert cap_shares([0.9, 0.05, 0.05], 0.4) == pytest.approx([0.4, 0.3, 0.3])


def test_an_inflated_reward_never_exceeds_the_cap(flower_identity):
    strategy = FeedbackFedAvg(
        min_available_nodes=1, reward_weighting="softmax", reward_temperature=0.01, max_client_weight=0.4
    )
    sent = list(
        strategy.configure_train(
            1, global_arrays(), __import__("flwr").app.ConfigRecord(), FakeGrid([1, 2, 3])
        )
    )
    replies = [
        reply_to(
            m, user_id=i, num_examples=10, seed=i, metrics=MetricRecord({"num-examples": 10, "reward": r})
        )
        for i, (m, r) in enumerate(zip(sent, [1.0, 0.1, 0.1], strict=True))
    ]
    strategy.aggregate_train(1, replies)
    weights = strategy.reports[(1, MessageType.TRAIN)].weights
    assert weights[0] == pytest.approx(0.4) and sum(weights.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("reward", "reason"),
    [(1.5, "outside [0, 1]"), (float("nan"), "not finite"), (None, "'reward' is missing")],
)
def test_bad_rewards_are_rejected(flower_identity, reward, reason):
    from flwr.app import ConfigRecord

    strategy = FeedbackFedAvg(min_available_nodes=1, reward_weighting="linear")
    sent = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid([1, 2])))
    bad_metrics = {"num-examples": 10} if reward is None else {"num-examples": 10, "reward": reward}
    replies = [
        reply_to(
            sent[0],
            user_id=0,
            num_examples=10,
            seed=0,
            metrics=MetricRecord({"num-examples": 10, "reward": 0.3}),
        ),
        reply_to(sent[1], user_id=1, num_examples=10, seed=1, metrics=MetricRecord(bad_metrics)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.reports[(1, MessageType.TRAIN)]
    assert list(report.user_metrics) == [0] and report.failures == 1
    assert reason in report.rejected[0].reason
    np.testing.assert_array_equal(arrays["a"].numpy(), replies[0].content["arrays"]["a"].numpy())


def test_qffl_shares_match_the_paper_update_by_hand():
    """Two clients, scalar parameters: w=1, w_1=0, w_2=3, losses 0.5 and 2, q=1, lr=0.5 (L=2).

    Delta_k = F_k^q L (w - w_k): 0.5*2*1 = 1 and 2*2*(-2) = -8;
    h_k = q F_k^(q-1) L^2 |w - w_k|^2 + L F_k^q: 1*1*4*1 + 2*0.5 = 5 and 1*1*4*4 + 2*2 = 20;
    w_new = 1 - (1 - 8) / 25 = 1.28; as shares a_k = L F_k^q / 25 = 0.04 and 0.16.
    """
    from flhf_core.server.aggregation import qffl_shares

    shares = qffl_shares([1.0, 4.0], [0.5, 2.0], q=1.0, learning_rate=0.5)
    assert shares == pytest.approx([0.04, 0.16], rel=1e-6)
    w_new = (1 - sum(shares)) * 1.0 + shares[0] * 0.0 + shares[1] * 3.0
    assert w_new == pytest.approx(1.28, rel=1e-6)
    # q = 0 and no drift: the plain mean of the clients
    assert qffl_shares([0.0, 0.0, 0.0], [0.3, 1.0, 2.0], q=0.0, learning_rate=0.1) == pytest.approx(
        [1 / 3] * 3
    )
    with pytest.raises(ValueError, match="non-negative"):
        qffl_shares([1.0], [float("nan")], q=1.0, learning_rate=0.1)


def test_history_weighting_favours_the_users_served_worst_so_far():
    from flhf_core.server.aggregation import reward_history_means

    history = {0: [0.30, 0.10], 1: [0.05, 0.15], 2: [0.40]}
    means = reward_history_means(history, [0, 1, 2])
    assert means == pytest.approx([0.20, 0.10, 0.40])
    weights = client_weights([10, 10, 10], "history", rewards=means, temperature=0.1)
    expected = np.exp(-np.array(means) / 0.1)
    assert weights == pytest.approx((expected / expected.sum()).tolist())
    assert weights[1] > weights[0] > weights[2]
    # the sign of the temperature does not flip it: history always favours the worst served
    assert client_weights([10, 10, 10], "history", rewards=means, temperature=-0.1) == pytest.approx(weights)
    with pytest.raises(ValueError, match="no reward history"):
        reward_history_means(history, [3])


def test_trusted_counts_take_the_servers_count_and_cap_a_claim_it_cannot_check():
    # user 0 counted by the server (its claim ignored), user 1 unknown to it: its claim, capped
    # at the largest count the server made; no counts at all: the claims, as FedAvg
    assert weighting_counts([1e9, 1e9], [40.0, None]) == [40.0, 40.0]
    assert weighting_counts([10.0, 30.0], [40.0, None]) == [40.0, 30.0]
    assert weighting_counts([10.0, 30.0], [None, None]) == [10.0, 30.0]


def test_average_metrics_by_hand():
    records = [
        {"loss": 1.0, "reward": 0.2, "reward-model-accuracy": 0.5, "scores": [1.0]},
        {"loss": 3.0, "reward": 0.4},
        {"loss": 5.0, "reward-model-accuracy": 0.8},
    ]
    found = average_metrics(records, [1.0, 1.0, 2.0], partial_prefix="reward-model-")
    # loss: all carry it; reward: not all, left out; the reward model's: over the two that have it
    assert found == pytest.approx({"loss": 3.5, "reward-model-accuracy": 0.7})
    assert "reward-model-accuracy" not in average_metrics(records, [1.0, 1.0, 2.0])
