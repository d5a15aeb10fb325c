"""The user's side of a shared reward model (issue 13): a real train handler call in a
feedback round, as Flower makes it, with the server's reward models in the message."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import SHORT_TEXTS
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import client_app
from flhf_core.config import RunConfig
from flhf_core.learning import reward_model as rm
from flhf_core.learning.model import build_model, parameters_to_record, tokenizer_fingerprint
from flhf_core.runs import cli

BUDGET = 6
SEED = int(os.environ.get("FLHF_TEST_SEED", "0"))  # rerun with other seeds to check robustness


def feedback_config(tmp_path, mode: str, *extra: str) -> RunConfig:
    items = [
        *SHORT_TEXTS,
        f"results-dir={tmp_path}",
        f"ratings-per-round={BUDGET}",
        f"reward-model={mode}",
        *extra,
    ]
    return RunConfig.from_mapping(cli.merged_config("feedback-smoke", items))


def train_in_feedback_round(config, tokenizer, reward_models=(), cluster=0):
    """The train handler's reply for user 1 of 2 in round 2 (a feedback round)."""
    model = build_model(config, tokenizer)
    content = RecordDict(
        {
            "arrays": parameters_to_record(model),
            "config": ConfigRecord(
                {"phase": "feedback", "server-round": 2, "tokenizer-sha256": tokenizer_fingerprint(tokenizer)}
            ),
        }
    )
    for k, record in enumerate(reward_models):
        content[f"reward-model-{k}"] = record
    if reward_models:
        content["reward-model-assignment"] = ConfigRecord({"cluster": cluster})
    context = Context(
        run_id=1,
        node_id=101,
        node_config={"partition-id": 1, "num-partitions": 2},
        state=RecordDict(),
        run_config=config.to_mapping(),
    )
    return model, client_app.train(
        Message(content=content, dst_node_id=101, message_type=MessageType.TRAIN), context
    )


def test_a_personal_reward_model_never_travels(flower_identity, tokenizer, tmp_path):
    _, reply = train_in_feedback_round(feedback_config(tmp_path, "personal"), tokenizer)
    assert not reply.has_error(), reply.error
    assert set(reply.content.array_records) == {"arrays"}
    assert 0 < reply.content["metrics"]["train-ratings-used"] <= BUDGET


def test_a_federated_reward_model_on_the_pretrained_sentence_encoder(flower_identity, tokenizer, tmp_path):
    """``reward-model-encoder = minilm``: the reward model that goes back is the sentence encoder's
    (BERT's layers, 384 wide), fitted on the user's judgements through its own tokenizer."""
    config = feedback_config(tmp_path, "federated", "reward-model-encoder=minilm")
    server = rm.RewardModel.from_sentence_encoder()
    sent = parameters_to_record(server, rm.shared_names(server, False))
    _, reply = train_in_feedback_round(config, tokenizer, [sent])
    assert not reply.has_error(), reply.error
    back = reply.content["reward-model"]
    assert set(back) == set(sent) and "encoder.encoder.layer.5.attention.self.query.weight" in back
    assert back["head.content.weight"].numpy().shape == (1, 384)
    assert any(not np.array_equal(back[k].numpy(), sent[k].numpy()) for k in back)
    assert 0 < reply.content["metrics"]["train-reward-model-judgements"] <= BUDGET


@pytest.mark.parametrize("mode", ["clustered", "federated with a personal head"])
def test_a_shared_reward_model_starts_from_the_servers_and_goes_back_fitted(
    flower_identity, tokenizer, tmp_path, mode
):
    """The user starts from its cluster's model (the one whose head says 3.0), fits it to its
    judgements and sends it back; clustered users also score every cluster's model. With a
    personal head, only the encoder comes and goes: the user's head starts at 0 (a new user's)."""
    torch.manual_seed(SEED)
    personal_head = mode.endswith("head")
    config = feedback_config(
        tmp_path, mode.split()[0], *(["reward-model-personal-head=true"] if personal_head else [])
    )
    summarizer = build_model(config, tokenizer)
    servers = []
    for bias in (-3.0, 3.0) if mode == "clustered" else (3.0,):
        model = rm.RewardModel.from_summarizer(summarizer)
        torch.nn.init.constant_(model.head.length.bias, bias)
        servers.append(parameters_to_record(model, rm.shared_names(model, personal_head)))
    cluster = len(servers) - 1
    _, reply = train_in_feedback_round(config, tokenizer, servers, cluster)
    assert not reply.has_error(), reply.error
    assert set(reply.content.array_records) == {"arrays", "reward-model"}
    metrics = reply.content["metrics"]
    assert 0 < metrics["train-ratings-used"] <= BUDGET
    assert metrics["train-reward-model-judgements"] == metrics["train-ratings-used"]
    assert metrics["reward-model-cluster"] == cluster
    sent_back = reply.content["reward-model"]
    assert set(sent_back) == set(servers[cluster])
    moved = [not np.array_equal(sent_back[k].numpy(), servers[cluster][k].numpy()) for k in sent_back]
    assert any(moved)
    if personal_head:
        assert not any(name.startswith("head.") for name in sent_back)  # the head never left
        return
    bias = float(sent_back["head.length.bias"].numpy()[0])
    assert 2.0 < bias < 3.0  # started from 3.0, moved towards the user's low ratings of a fresh model
    losses = metrics["reward-model-cluster-losses"]
    assert len(losses) == 2 and losses[0] < losses[1]  # sigmoid(-3) fits ratings near 0 better


def test_a_user_moved_to_another_cluster_starts_its_gate_record_anew():
    """The gate's checks measured one model; a clustered user moved to another cluster scores
    with another one, which must earn trust anew. The user's own first model and a cluster
    it stays in keep the record."""
    from flhf_core.client.reward_models import checked_by

    own = rm.Judgements([("d", "s", 0.5)], [], checks=[1.0] * 20)  # made by the user's own model
    first = checked_by(own, 1)
    assert first.checks == [1.0] * 20 and first.checked_cluster == 1
    assert checked_by(first, 1).checks == [1.0] * 20  # stays: the same cluster's model
    moved = checked_by(first, 0)
    assert moved.checks == [] and moved.checked_cluster == 0 and moved.rated == own.rated
    assert first.checks == [1.0] * 20  # the record of the cluster it left is not cleared in place
