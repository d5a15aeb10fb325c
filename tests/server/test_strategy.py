"""FeedbackFedAvg fed with real Flower replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from flhf_core.protocol import USER_ID, USER_RECORD
from flhf_core.results.checkpoint import CheckpointError
from flhf_core.server.aggregation import client_weights, weighted_average
from flhf_core.server.reward_models import RewardModelExchange, check_resumable
from flhf_core.server.reward_pool import RewardModelPool
from flhf_core.server.strategy import FeedbackFedAvg

SHAPES = {"a": (3, 4), "b": (5,)}


class FakeGrid:
    """Stands in for the Grid where only node ids are needed."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def global_arrays(value=0.0):
    return ArrayRecord({k: Array(np.full(s, value, dtype=np.float32)) for k, s in SHAPES.items()})


def reply_to(sent: Message, user_id: int, num_examples: float, seed: int, **replace) -> Message:
    """A client's reply; ``replace`` swaps (or, with None, drops) records of its content."""
    rng = np.random.default_rng(seed)
    arrays = ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()})
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": float(seed)})
    content = RecordDict(
        {"arrays": arrays, "metrics": metrics, USER_RECORD: ConfigRecord({USER_ID: user_id})}
    )
    for key, value in replace.items():
        if value is None:
            del content[key]
        else:
            content[key] = value
    return Message(content=content, reply_to=sent)


@pytest.fixture
def round_one(flower_identity):
    """A strategy that sent round 1 to four nodes, and those messages."""
    strategy = FeedbackFedAvg(min_available_nodes=1, sampling_seed=3)
    sent = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid([11, 12, 13, 14])))
    for message in sent:  # what Grid.push_messages does: give each message its id
        message.metadata.__dict__["_message_id"] = message.object_id
    return strategy, sent


def test_none_weighting_equals_flower_fedavg_on_unequal_weights(round_one):
    strategy, sent = round_one
    counts = [10, 250, 37, 3]
    replies = [
        reply_to(m, user_id=i, num_examples=n, seed=i)
        for i, (m, n) in enumerate(zip(sent, counts, strict=False))
    ]
    ours, our_metrics = strategy.aggregate_train(1, replies)
    theirs, their_metrics = FedAvg().aggregate_train(1, replies)
    for key in SHAPES:
        np.testing.assert_array_equal(ours[key].numpy(), theirs[key].numpy())
    assert our_metrics["train-loss"] == pytest.approx(their_metrics["train-loss"])
    assert strategy.reports[(1, MessageType.TRAIN)].weights == pytest.approx(
        {i: n / sum(counts) for i, n in enumerate(counts)}
    )


def test_arrival_order_does_not_change_the_result(round_one):
    strategy, sent = round_one
    replies = [reply_to(m, user_id=i, num_examples=7 + 13 * i, seed=i) for i, m in enumerate(sent)]
    forward, _ = strategy.aggregate_train(1, replies)
    backward, _ = strategy.aggregate_train(1, replies[::-1])
    for key in SHAPES:
        np.testing.assert_array_equal(forward[key].numpy(), backward[key].numpy())


def test_bad_replies_are_rejected_and_the_round_goes_on(round_one):
    strategy, sent = round_one
    nan = ArrayRecord({k: Array(np.full(s, np.nan, dtype=np.float32)) for k, s in SHAPES.items()})
    replies = [
        reply_to(sent[0], user_id=0, num_examples=10, seed=0),
        reply_to(sent[1], user_id=1, num_examples=10, seed=1, arrays=nan),
        reply_to(
            sent[2], user_id=2, num_examples=10, seed=2, **{USER_RECORD: ConfigRecord({USER_ID: "two"})}
        ),
        Message(Error(code=0, reason="client crashed"), reply_to=sent[3]),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.reports[(1, MessageType.TRAIN)]
    assert list(report.user_metrics) == [0]
    assert report.failures == 3
    reasons = " | ".join(r.reason for r in report.rejected)
    assert "non-finite" in reasons and "user-id' is not an integer" in reasons and "client crashed" in reasons
    # the one valid reply is the new model; the crashed reply is attributed to the node it was sent to
    np.testing.assert_array_equal(arrays["a"].numpy(), replies[0].content["arrays"]["a"].numpy())
    assert sent[3].metadata.dst_node_id in {r.node_id for r in report.rejected}


def test_missing_weight_key_is_rejected_where_fedavg_would_raise(round_one):
    strategy, sent = round_one
    good = reply_to(sent[0], user_id=0, num_examples=5, seed=0)
    bad = reply_to(sent[1], user_id=1, num_examples=5, seed=1, metrics=MetricRecord({"train-loss": 1.0}))
    arrays, _ = strategy.aggregate_train(1, [good, bad])
    assert arrays is not None and strategy.reports[(1, MessageType.TRAIN)].failures == 3  # 4 sampled, 1 valid
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_train(1, [good, bad])


def test_no_valid_reply_leaves_the_model_unchanged(round_one):
    strategy, sent = round_one
    arrays, metrics = strategy.aggregate_train(1, [Message(Error(code=0, reason="x"), reply_to=sent[0])])
    assert arrays is None and metrics is None


def test_sampling_is_seeded_and_respects_fraction(flower_identity):
    grid = FakeGrid(range(100, 120))
    a = FeedbackFedAvg(fraction_train=0.25, min_available_nodes=1, sampling_seed=1)
    b = FeedbackFedAvg(fraction_train=0.25, min_available_nodes=1, sampling_seed=1)
    nodes = [m.metadata.dst_node_id for m in a.configure_train(1, global_arrays(), ConfigRecord(), grid)]
    assert len(nodes) == 5
    assert nodes == [
        m.metadata.dst_node_id for m in b.configure_train(1, global_arrays(), ConfigRecord(), grid)
    ]
    later = [m.metadata.dst_node_id for m in a.configure_train(2, global_arrays(), ConfigRecord(), grid)]
    assert later != nodes


def test_waiting_for_nodes_times_out(flower_identity):
    strategy = FeedbackFedAvg(min_available_nodes=3, node_wait_timeout=0.0)
    with pytest.raises(TimeoutError, match="only 1 nodes connected"):
        strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid([1]))


def test_client_weights_and_weighted_average():
    weights = client_weights([1, 3])
    assert weights == [0.25, 0.75] and sum(client_weights([2, 5, 9])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive"):
        client_weights([0, 1])
    average = weighted_average([{"w": np.ones(2)}, {"w": np.full(2, 5.0)}], weights)
    np.testing.assert_allclose(average["w"], [4.0, 4.0])
    with pytest.raises(ValueError, match="different parameter names"):
        weighted_average([{"w": np.ones(2)}, {"v": np.ones(2)}], weights)


def test_a_silent_node_is_a_failure_named_by_its_user(round_one):
    strategy, sent = round_one
    strategy.aggregate_train(1, [reply_to(m, user_id=i, num_examples=5, seed=i) for i, m in enumerate(sent)])
    later = list(strategy.configure_train(2, global_arrays(), ConfigRecord(), FakeGrid([11, 12, 13, 14])))
    for message in later:
        message.metadata.__dict__["_message_id"] = message.object_id
    survivors = [reply_to(m, user_id=i, num_examples=5, seed=i) for i, m in enumerate(later) if i != 2]
    arrays, _ = strategy.aggregate_train(2, survivors)  # user 2's node never answered (killed, timed out)
    report = strategy.reports[(2, MessageType.TRAIN)]
    assert arrays is not None and report.failures == 1
    (silent,) = report.rejected
    assert (
        silent.user_id == 2
        and "no reply" in silent.reason
        and silent.node_id == later[2].metadata.dst_node_id
    )


@pytest.mark.parametrize(
    ("name", "array"),
    [
        ("a", np.zeros((4, 3), dtype=np.float32)),  # transposed: would raise when averaged
        ("b", np.zeros((1,), dtype=np.float32)),  # broadcasts: would be silently averaged in
        ("b", np.zeros((5,), dtype=np.float64)),  # another dtype
    ],
)
def test_a_reply_with_the_wrong_shape_or_dtype_is_rejected(round_one, name, array):
    strategy, sent = round_one
    bad = reply_to(sent[1], user_id=1, num_examples=10, seed=1)
    bad.content["arrays"][name] = Array(array)
    good = reply_to(sent[0], user_id=0, num_examples=10, seed=0)
    arrays, _ = strategy.aggregate_train(1, [good, bad])
    report = strategy.reports[(1, MessageType.TRAIN)]
    assert list(report.user_metrics) == [0] and f"parameter '{name}' is" in report.rejected[0].reason
    np.testing.assert_array_equal(arrays["b"].numpy(), good.content["arrays"]["b"].numpy())


def test_replies_are_checked_even_when_the_strategy_did_not_send_the_round(flower_identity):
    """Another loop may send the messages; shapes and finiteness are still checked (against
    the signature most replies share)."""
    strategy = FeedbackFedAvg(min_available_nodes=1)
    sent = [
        Message(RecordDict({"arrays": global_arrays()}), dst_node_id=n, message_type=MessageType.TRAIN)
        for n in (5, 6, 7)
    ]
    for message in sent:
        message.metadata.__dict__["_message_id"] = message.object_id
    nan = ArrayRecord({k: Array(np.full(s, np.nan, dtype=np.float32)) for k, s in SHAPES.items()})
    wrong = ArrayRecord({"a": Array(np.zeros((1, 4), dtype=np.float32)), "b": Array(np.zeros(5, np.float32))})
    replies = [
        reply_to(sent[0], user_id=0, num_examples=3, seed=0),
        reply_to(sent[1], user_id=1, num_examples=3, seed=1, arrays=nan),
        reply_to(sent[2], user_id=2, num_examples=3, seed=2, arrays=wrong),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and list(strategy.reports[(1, MessageType.TRAIN)].user_metrics) == [0]


def test_drop_in_for_fedavg_with_replies_that_name_no_user(round_one):
    """Any Flower ClientApp's replies: known by node id, averaged exactly as FedAvg does."""
    strategy, sent = round_one
    replies = [
        reply_to(m, user_id=0, num_examples=n, seed=i, **{USER_RECORD: None})
        for i, (m, n) in enumerate(zip(sent, [10, 250, 37, 3], strict=True))
    ]
    ours, _ = strategy.aggregate_train(1, replies)
    theirs, _ = FedAvg().aggregate_train(1, replies)
    for key in SHAPES:
        np.testing.assert_array_equal(ours[key].numpy(), theirs[key].numpy())
    report = strategy.reports[(1, MessageType.TRAIN)]
    assert (
        sorted(report.user_metrics) == sorted(m.metadata.dst_node_id for m in sent) and report.failures == 0
    )


def test_a_claimed_billion_examples_buys_nothing_when_the_server_counts(round_one):
    strategy, sent = round_one
    strategy.example_counts = {0: 100.0, 1: 100.0, 2: 100.0, 3: 100.0}.get
    claims = [1e9, 100, 100, 100]
    replies = [
        reply_to(m, user_id=i, num_examples=n, seed=i)
        for i, (m, n) in enumerate(zip(sent, claims, strict=True))
    ]
    strategy.aggregate_train(1, replies)
    assert strategy.reports[(1, MessageType.TRAIN)].weights == pytest.approx({i: 0.25 for i in range(4)})


def test_sampling_picks_the_same_users_whatever_their_node_ids(flower_identity):
    """Flower draws node ids at random per run; with the users known, the seed decides alone."""
    chosen = []
    for step in (13, -7):  # node ids in another order than the users, as Flower draws them
        nodes = [50_000 + step * ((7 * user) % 20 if step < 0 else user) for user in range(20)]
        strategy = FeedbackFedAvg(fraction_train=0.25, min_available_nodes=1, sampling_seed=1)
        strategy.node_users = {node: user for user, node in enumerate(nodes)}
        sent = strategy.configure_train(3, global_arrays(), ConfigRecord(), FakeGrid(nodes[::-1]))
        chosen.append(sorted(strategy.node_users[m.metadata.dst_node_id] for m in sent))
    assert len(chosen[0]) == 5 and chosen[0] == chosen[1]


def test_qfedavg_weighting_steps_as_flower_qfedavg(flower_identity):
    """q-FFL through FeedbackFedAvg equals Flower 1.42's own QFedAvg on the same replies."""
    from flwr.serverapp.strategy import QFedAvg

    ours = FeedbackFedAvg(min_available_nodes=1, reward_weighting="qfedavg", q=0.5, client_learning_rate=0.05)
    theirs = QFedAvg(client_learning_rate=0.05, q=0.5, train_loss_key="train-loss", min_available_nodes=1)
    grid = FakeGrid([11, 12, 13])
    start = global_arrays(0.25)
    sent = list(ours.configure_train(1, start, ConfigRecord(), grid))
    list(theirs.configure_train(1, start, ConfigRecord(), grid))
    for message in sent:
        message.metadata.__dict__["_message_id"] = message.object_id
    replies = [reply_to(m, user_id=i, num_examples=10 * (i + 1), seed=i + 1) for i, m in enumerate(sent)]
    fedavg, _ = FedAvg().aggregate_train(1, replies)
    mine, _ = ours.aggregate_train(1, replies)
    flower, _ = theirs.aggregate_train(1, replies)  # last: Flower's QFedAvg consumes the replies' arrays
    for key in SHAPES:
        np.testing.assert_allclose(mine[key].numpy(), flower[key].numpy(), rtol=1e-5, atol=1e-6)
    # and it is not FedAvg: a higher-loss user pulls harder, the step is shrunk
    assert not np.allclose(mine["a"].numpy(), fedavg["a"].numpy(), atol=1e-3)


def test_qfedavg_rejects_a_reply_without_its_train_loss(round_one):
    strategy, sent = round_one
    strategy.reward_weighting = "qfedavg"
    replies = [reply_to(m, user_id=i, num_examples=5, seed=i + 1) for i, m in enumerate(sent)]
    del replies[0].content["metrics"]["train-loss"]
    strategy.aggregate_train(1, replies)
    rejected = strategy.reports[(1, MessageType.TRAIN)].rejected
    assert [r.user_id for r in rejected] == [0] and "train-loss" in rejected[0].reason


def test_train_users_sample_only_the_learner(flower_identity):
    """Centralized mode: only the learner trains; every user is still sampled to evaluate."""
    strategy = FeedbackFedAvg(min_available_nodes=1, sampling_seed=3, train_users=(0,))
    strategy.node_users = {21: 1, 22: 0, 23: 2}
    grid = FakeGrid([21, 22, 23])
    train = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), grid))
    evaluate = list(strategy.configure_evaluate(1, global_arrays(), ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in train] == [22]
    assert sorted(m.metadata.dst_node_id for m in evaluate) == [21, 22, 23]


def test_history_weighting_accumulates_each_users_received_reward(round_one):
    strategy, sent = round_one
    strategy.reward_weighting = "history"

    def replies(round_sent, befores):
        out = []
        for i, (m, before) in enumerate(zip(round_sent, befores, strict=True)):
            reply = reply_to(m, user_id=i, num_examples=10, seed=i)
            reply.content["metrics"]["reward"] = 0.5
            reply.content["metrics"]["reward-before"] = before
            out.append(reply)
        return out

    strategy.aggregate_train(1, replies(sent, [0.1, 0.3, 0.3, 0.3]))
    first = strategy.reports[(1, MessageType.TRAIN)].weights
    assert first[0] > first[1] == pytest.approx(first[2])
    grid = FakeGrid([11, 12, 13, 14])
    second_sent = list(strategy.configure_train(2, global_arrays(), ConfigRecord(), grid))
    for message in second_sent:
        message.metadata.__dict__["_message_id"] = message.object_id
    strategy.aggregate_train(2, replies(second_sent, [0.5, 0.3, 0.3, 0.3]))
    assert strategy.reward_history[0] == [0.1, 0.5]
    second = strategy.reports[(2, MessageType.TRAIN)].weights
    # user 0's history averages to the others' 0.3: equal weights (this round alone would weigh it least)
    assert second[0] == pytest.approx(second[1])


@pytest.mark.parametrize("weighting", ["gain", "history", "qfedavg"])
def test_an_evaluation_reply_needs_no_reward_before(flower_identity, weighting):
    """The weighting's required metrics are asked of training replies only (an evaluate reply
    carries no update, so no reward-before): the final model's evaluation is never rejected."""
    strategy = FeedbackFedAvg(min_available_nodes=1, reward_weighting=weighting)
    grid = FakeGrid([11, 12])
    sent = list(strategy.configure_evaluate(2, global_arrays(), ConfigRecord(), grid))
    for message in sent:
        message.metadata.__dict__["_message_id"] = message.object_id
    metrics = MetricRecord({"num-examples": 4, "reward": 0.2})
    replies = [
        Message(RecordDict({"metrics": metrics, USER_RECORD: ConfigRecord({USER_ID: i})}), reply_to=m)
        for i, m in enumerate(sent)
    ]
    averaged = strategy.aggregate_evaluate(2, replies)
    assert averaged is not None and averaged["reward"] == pytest.approx(0.2)
    assert not strategy.reports[(2, MessageType.EVALUATE)].rejected


def rm_reply(sent: Message, user: int, value: float, judgements: float, shape=(2,), **extra) -> Message:
    """A feedback-round reply with the user's reward model (``reward-model = clustered``)."""
    reply = reply_to(sent, user, 10, seed=user)
    reply.content["reward-model"] = ArrayRecord({"head.w": Array(np.full(shape, value, dtype=np.float32))})
    metrics = reply.content["metrics"]
    metrics["train-reward-model-judgements"] = judgements
    metrics["reward-model-cluster"] = float(sent.content["reward-model-assignment"]["cluster"])
    for key, value_ in extra.items():
        metrics[key] = value_
    return reply


def sent_round(strategy, server_round, grid):
    sent = list(strategy.configure_train(server_round, global_arrays(), ConfigRecord(), grid))
    for message in sent:
        message.metadata.__dict__["_message_id"] = message.object_id
    return sent


def test_reward_models_travel_only_in_the_rounds_that_use_them_and_are_screened(flower_identity):
    pool = RewardModelPool(clusters=2, seed=0)
    pool.assignment = {0: 0, 1: 1, 2: 0, 3: 1}
    strategy = FeedbackFedAvg(
        min_available_nodes=1, sampling_seed=3, reward_models=RewardModelExchange(pool, budget=4)
    )
    strategy.node_users = {11: 0, 12: 1, 13: 2, 14: 3}
    grid = FakeGrid([11, 12, 13, 14])
    assert all(set(m.content.array_records) == {"arrays"} for m in sent_round(strategy, 1, grid))
    strategy.reward_models_active = True  # a feedback round; nobody has judged anything yet
    sent = sent_round(strategy, 2, grid)
    assert all(set(m.content.array_records) == {"arrays"} for m in sent)
    by_user = {strategy.node_users[m.metadata.dst_node_id]: m for m in sent}
    assert {u: m.content["reward-model-assignment"]["cluster"] for u, m in by_user.items()} == pool.assignment
    replies = [
        rm_reply(by_user[0], 0, 1.0, 1),
        rm_reply(by_user[1], 1, 3.0, 3),
        rm_reply(by_user[2], 2, 5.0, 2, shape=(3,)),  # a reward model of another shape
        reply_to(by_user[3], 3, 10, seed=3),  # no reward model at all
    ]
    _, metrics = strategy.aggregate_train(2, replies)
    rejected = {r.user_id: r.reason for r in strategy.reports[(2, MessageType.TRAIN)].rejected}
    assert set(rejected) == {2, 3}, rejected
    assert "reward model" in rejected[2] and "ArrayRecords" in rejected[3]
    assert "reward-model-cluster" not in metrics and metrics["reward-model-clusters-changed"] == 0
    # the next feedback round carries both clusters' models: each its valid users' average
    sent = sent_round(strategy, 3, grid)
    assert all(set(m.content.array_records) == {"arrays", "reward-model-0", "reward-model-1"} for m in sent)
    np.testing.assert_allclose(sent[0].content["reward-model-0"]["head.w"].numpy(), 1.0)
    np.testing.assert_allclose(sent[0].content["reward-model-1"]["head.w"].numpy(), 3.0)
    by_user = {strategy.node_users[m.metadata.dst_node_id]: m for m in sent}
    bad_losses = rm_reply(by_user[0], 0, 1.0, 1, **{"reward-model-cluster-losses": [0.1, 0.2, 0.3]})
    greedy = rm_reply(by_user[1], 1, 2.0, 1e12)  # claims a trillion judgements: capped at 4 x 2 rounds
    # its round-2 reply was rejected, but it judged then too: 8 is what it can have given
    honest = rm_reply(by_user[3], 3, 10.0, 8)
    strategy.aggregate_train(3, [bad_losses, greedy, honest])
    report = strategy.reports[(3, MessageType.TRAIN)]
    assert "one loss per cluster" in {r.user_id: r.reason for r in report.rejected}[0]
    assert {1, 3} <= set(report.user_metrics)
    np.testing.assert_allclose(pool.models[1]["head.w"], (8 * 2.0 + 8 * 10.0) / 16)
    # a resume restores exactly this state, and refuses a damaged one
    info, arrays = strategy.reward_models.state()
    again = RewardModelExchange(RewardModelPool(clusters=2, seed=0), budget=4)
    again.restore(info, arrays)
    assert (
        again.pool.assignment == pool.assignment and again.rounds_taken == strategy.reward_models.rounds_taken
    )
    for k in (0, 1):
        assert np.array_equal(again.pool.models[k]["head.w"], pool.models[k]["head.w"])
    with pytest.raises(CheckpointError, match="not all whole"):
        again.restore(info, {k: v for k, v in arrays.items() if not k.startswith("1/")})
    with pytest.raises(CheckpointError, match="clusters"):
        RewardModelExchange(RewardModelPool(clusters=3, seed=0), budget=4).restore(info, arrays)
    with pytest.raises(CheckpointError, match="before such runs could be resumed"):
        check_resumable({"reward-model-versions": 1}, "clustered", shared=True)
    check_resumable({"reward-model-versions": 1}, "personal", shared=False)
    check_resumable({}, "none", shared=False)
    np.testing.assert_allclose(pool.models[0]["head.w"], 1.0)  # no valid reply: kept


def test_a_reward_models_diagnostics_average_over_the_users_who_have_them(round_one):
    """A user who has judged nothing yet has no reward-model accuracy: the server row averages
    the others' instead of dropping the figure; any other key must be in every reply."""
    strategy, sent = round_one
    replies = [reply_to(m, user_id=i, num_examples=10, seed=i) for i, m in enumerate(sent[:2])]
    replies[0].content["metrics"]["reward-model-accuracy"] = 0.8
    replies[0].content["metrics"]["only-here"] = 1.0
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["reward-model-accuracy"] == pytest.approx(0.8)
    assert "only-here" not in metrics and "train-loss" in metrics


def test_a_server_learning_rate_moves_part_of_the_way_to_the_average(flower_identity):
    """theta <- theta + eta (average - theta): eta = 1 is FedAvg bit for bit; eta = 0.25 lands
    a quarter of the way from the sent model to FedAvg's average."""
    grid = FakeGrid([11, 12])
    start = global_arrays(0.5)

    def aggregate(eta):
        strategy = FeedbackFedAvg(min_available_nodes=1, server_learning_rate=eta)
        sent = list(strategy.configure_train(1, start, ConfigRecord(), grid))
        replies = [reply_to(m, user_id=i, num_examples=10 * (i + 1), seed=i + 1) for i, m in enumerate(sent)]
        return strategy.aggregate_train(1, replies)[0], strategy.reports[(1, MessageType.TRAIN)].step

    fedavg, step = aggregate(1.0)
    damped, damped_step = aggregate(0.25)
    for key in SHAPES:
        expected = start[key].numpy() + 0.25 * (fedavg[key].numpy() - start[key].numpy())
        np.testing.assert_allclose(damped[key].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert (step, damped_step) == (1.0, 0.25)
