"""Replies are screened on what their arrays hold, not on what they declare; a node answers for
its own user only; no reply, however formed, ends a round while others are valid."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from test_strategy import SHAPES, FakeGrid, global_arrays, reply_to

from flhf_core.client import faults
from flhf_core.protocol import USER_ID, USER_RECORD
from flhf_core.results.rounds import REJECTION_CODES, rejection_counts
from flhf_core.server.replies import decode_arrays, signature
from flhf_core.server.strategy import FeedbackFedAvg


def npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def forged(name: str, data: bytes, shape=None, dtype="float32") -> ArrayRecord:
    """The global model's arrays with ``name``'s bytes replaced; its declared shape and dtype
    stay the global model's unless given."""
    arrays = dict(global_arrays().items())
    arrays[name] = Array(dtype=dtype, shape=shape or SHAPES[name], stype="numpy.ndarray", data=data)
    return ArrayRecord(arrays)


FORGERIES = {
    "shape": lambda: forged("a", npy(np.zeros((1,), np.float32))),  # declares (3, 4), holds (1,)
    "dtype": lambda: forged("a", npy(np.zeros((3, 4), np.float64))),  # declares float32, holds float64
    "decode": lambda: forged("a", b"\x93NUMPY garbage that is no array"),
    "size": lambda: forged("b", npy(np.zeros((5_000,), np.float32))),  # far more than a (5,) takes
    "non-finite": lambda: forged("b", npy(np.array([0, 1, np.inf, 2, 3], np.float32))),
}


@pytest.fixture
def round_one(flower_identity):
    strategy = FeedbackFedAvg(min_available_nodes=1, sampling_seed=3)
    sent = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid([11, 12, 13, 14])))
    for message in sent:
        message.metadata.__dict__["_message_id"] = message.object_id
    return strategy, sent


@pytest.mark.parametrize("code", sorted(FORGERIES))
def test_a_forged_array_is_rejected_with_its_code_and_the_round_goes_on(round_one, code):
    strategy, sent = round_one
    honest = [reply_to(m, user_id=i, num_examples=10, seed=i) for i, m in enumerate(sent[:3])]
    rogue = reply_to(sent[3], user_id=3, num_examples=10, seed=3, arrays=FORGERIES[code]())
    arrays, _ = strategy.aggregate_train(1, [*honest, rogue])
    report = strategy.reports[(1, MessageType.TRAIN)]
    assert [(r.user_id, r.code) for r in report.rejected] == [(3, code)]
    assert sorted(report.user_metrics) == [0, 1, 2]
    expected = np.mean([r.content["arrays"]["a"].numpy() for r in honest], axis=0)
    np.testing.assert_allclose(arrays["a"].numpy(), expected, rtol=1e-6)
    assert all(arrays[k].numpy().dtype == np.float32 for k in SHAPES)  # the global model stays float32
    assert rejection_counts(report.rejected)[f"rejected-{code}"] == 1


def test_a_list_valued_reward_fails_the_reply_not_the_round(round_one):
    strategy, sent = round_one
    strategy.reward_weighting = "linear"
    good = [
        reply_to(
            m, user_id=i, num_examples=10, seed=i, metrics=MetricRecord({"num-examples": 10, "reward": 0.5})
        )
        for i, m in enumerate(sent[:2])
    ]
    bad = reply_to(
        sent[2],
        user_id=2,
        num_examples=10,
        seed=2,
        metrics=MetricRecord({"num-examples": 10, "reward": [0.5, 0.9]}),
    )
    arrays, _ = strategy.aggregate_train(1, [*good, bad])
    report = strategy.reports[(1, MessageType.TRAIN)]
    assert arrays is not None and [(r.user_id, r.code) for r in report.rejected if r.user_id == 2] == [
        (2, "metrics")
    ]


def test_a_node_answers_for_its_own_user_only(round_one):
    strategy, sent = round_one
    strategy.node_users = {m.metadata.dst_node_id: i for i, m in enumerate(sent)}
    replies = [reply_to(m, user_id=i, num_examples=10, seed=i) for i, m in enumerate(sent[:3])]
    thief = reply_to(sent[3], user_id=0, num_examples=1e9, seed=3)  # node of user 3 claims user 0
    strategy.aggregate_train(1, [thief, *replies])  # the thief answers first
    report = strategy.reports[(1, MessageType.TRAIN)]
    assert sorted(report.user_metrics) == [0, 1, 2]  # the real user 0 still counts
    assert [(r.user_id, r.code) for r in report.rejected] == [(0, "identity")]
    assert strategy.node_users[sent[3].metadata.dst_node_id] == 3  # its binding did not move


def test_an_unbound_node_cannot_take_a_user_another_node_holds(round_one):
    strategy, sent = round_one
    strategy.node_users = {sent[0].metadata.dst_node_id: 0}
    first = reply_to(sent[0], user_id=0, num_examples=10, seed=0)
    impostor = reply_to(sent[1], user_id=0, num_examples=10, seed=1)
    strategy.aggregate_train(1, [impostor, first])
    report = strategy.reports[(1, MessageType.TRAIN)]
    assert list(report.user_metrics) == [0]
    codes = {r.node_id: r.code for r in report.rejected}
    assert codes[sent[1].metadata.dst_node_id] == "identity"
    assert sent[1].metadata.dst_node_id not in strategy.node_users


def test_sampling_leaves_unidentified_nodes_out_when_the_owner_identifies(flower_identity):
    strategy = FeedbackFedAvg(min_available_nodes=1, sampling_seed=3)
    strategy.node_users = {11: 0, 12: 1}
    strategy.identified_only = True
    sent = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid([11, 12, 99])))
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 12]


def test_decode_arrays_reads_the_bytes_once_and_returns_them():
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    decoded, problem = decode_arrays(arrays, signature(arrays))
    assert problem is None and decoded["w"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_every_code_is_counted_even_when_zero():
    assert set(rejection_counts([])) == {f"rejected-{c}" for c in REJECTION_CODES}
    assert not any(rejection_counts([]).values())


def test_a_garbage_reply_record_of_any_kind_never_raises(round_one):
    """Replies holding records of the wrong kinds or none at all are rejected, never raised on."""
    strategy, sent = round_one
    shapes = [
        RecordDict(),
        RecordDict({"metrics": MetricRecord({"num-examples": 1.0})}),
        RecordDict(
            {
                "arrays": ArrayRecord(),
                "metrics": MetricRecord({"num-examples": 1.0}),
                USER_RECORD: ConfigRecord({USER_ID: 1}),
            }
        ),
    ]
    from flwr.app import Message

    replies = [Message(content=c, reply_to=m) for c, m in zip(shapes, sent[1:], strict=True)]
    arrays, _ = strategy.aggregate_train(1, [reply_to(sent[0], user_id=0, num_examples=1, seed=0), *replies])
    assert arrays is not None
    assert len(strategy.reports[(1, MessageType.TRAIN)].rejected) == 3


@pytest.mark.parametrize("kind", sorted(set(faults.KINDS) - {"slow"}))
def test_every_forgery_of_the_rogue_client_is_rejected_with_its_code(round_one, kind, monkeypatch):
    strategy, sent = round_one
    strategy.node_users = {m.metadata.dst_node_id: i for i, m in enumerate(sent)}
    honest = [reply_to(m, user_id=i, num_examples=10, seed=i) for i, m in enumerate(sent[:3])]
    rogue = faults.forge(reply_to(sent[3], user_id=3, num_examples=10, seed=3), kind, num_users=4)
    arrays, _ = strategy.aggregate_train(1, [rogue, *honest])
    report = strategy.reports[(1, MessageType.TRAIN)]
    assert arrays is not None and sorted(report.user_metrics) == [0, 1, 2]
    assert [r.code for r in report.rejected] == [faults.REJECTED_AS[kind]]


def test_the_rogue_option_does_nothing_unless_fault_injection_is_enabled(monkeypatch, flower_identity):
    from flwr.app import Context

    sent = list(
        FeedbackFedAvg(min_available_nodes=1, min_train_nodes=1).configure_train(
            1, global_arrays(), ConfigRecord(), FakeGrid([5])
        )
    )
    context = Context(run_id=1, node_id=5, node_config={"rogue": "nan"}, state=RecordDict(), run_config={})
    reply = reply_to(sent[0], user_id=0, num_examples=1, seed=0)
    before = reply.content["arrays"]["a"].numpy().copy()
    monkeypatch.delenv(faults.ENABLE, raising=False)
    assert np.array_equal(faults.misbehave(reply, context, 1, 0, 2).content["arrays"]["a"].numpy(), before)
    monkeypatch.setenv(faults.ENABLE, "1")
    assert np.isnan(faults.misbehave(reply, context, 1, 0, 2).content["arrays"]["a"].numpy()).all()


def test_a_reply_listing_the_parameters_in_another_order_is_averaged_by_name(round_one):
    strategy, sent = round_one
    replies = [reply_to(m, user_id=i, num_examples=10, seed=i) for i, m in enumerate(sent)]
    reordered = ArrayRecord(dict(reversed(list(replies[3].content["arrays"].items()))))
    replies[3].content["arrays"] = reordered
    arrays, _ = strategy.aggregate_train(1, replies)
    assert not strategy.reports[(1, MessageType.TRAIN)].rejected
    expected = np.mean([r.content["arrays"]["b"].numpy() for r in replies], axis=0)
    np.testing.assert_allclose(arrays["b"].numpy(), expected, rtol=1e-6)


def test_no_signature_is_taken_from_a_tie_or_a_malformed_declaration(round_one):
    from flwr.app import Message

    from flhf_core.server.replies import majority_signature

    _, sent = round_one
    honest = reply_to(sent[0], user_id=0, num_examples=1, seed=0)
    rogue = Message(
        content=RecordDict({"arrays": ArrayRecord({"a": Array(np.zeros(3, np.float32))})}), reply_to=sent[1]
    )
    assert majority_signature([honest, rogue], "arrays") is None  # one against one decides nothing
    assert majority_signature(
        [honest, reply_to(sent[2], user_id=2, num_examples=1, seed=2), rogue], "arrays"
    ) == signature(honest.content["arrays"])
    odd = ArrayRecord(
        {"a": Array(dtype="not-a-dtype", shape=(3,), stype="numpy.ndarray", data=npy(np.zeros(3)))}
    )
    weird = Message(content=RecordDict({"arrays": odd}), reply_to=sent[3])
    assert majority_signature([weird], "arrays") is None


def test_metrics_named_like_a_rows_columns_are_rejected(round_one):
    strategy, sent = round_one
    good = reply_to(sent[0], user_id=0, num_examples=10, seed=0)
    sly = reply_to(
        sent[1], user_id=1, num_examples=10, seed=1, metrics=MetricRecord({"num-examples": 10, "client": 0})
    )
    strategy.aggregate_train(1, [good, sly])
    assert [
        (r.user_id, r.code) for r in strategy.reports[(1, MessageType.TRAIN)].rejected if r.user_id == 1
    ] == [(1, "metrics")]


def test_a_negative_loss_fails_a_qfedavg_reply_not_the_round(round_one):
    strategy, sent = round_one
    strategy.reward_weighting = "qfedavg"
    replies = [reply_to(m, user_id=i, num_examples=10, seed=i + 1) for i, m in enumerate(sent[:3])]
    replies.append(
        reply_to(
            sent[3],
            user_id=3,
            num_examples=10,
            seed=3,
            metrics=MetricRecord({"num-examples": 10, "train-loss": -1.0}),
        )
    )
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert [(r.user_id, r.code) for r in strategy.reports[(1, MessageType.TRAIN)].rejected] == [
        (3, "metrics")
    ]


def test_absurd_example_claims_never_overflow_the_weights():
    import math

    from flhf_core.server.aggregation import client_weights, weighting_counts

    counts = weighting_counts([1e308, 1e308, 10.0], [None, None, None])
    weights = client_weights(counts, "none")
    assert all(math.isfinite(w) for w in weights) and sum(weights) == pytest.approx(1.0)
