"""The ClientApp's handlers, called as Flower calls them: a real Message and Context."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import client_app
from flhf_core.client import evaluation
from flhf_core.data.corpus import load_corpus
from flhf_core.learning.model import parameters_to_record, tokenizer_fingerprint
from flhf_core.protocol import USER_ID, USER_RECORD


def context(config, partition_id=1, num_partitions=3):
    return Context(
        run_id=1,
        node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=config.to_mapping(),
    )


def message(model, tokenizer, kind, sha=None):
    config = ConfigRecord(
        {"phase": "sft", "server-round": 1, "tokenizer-sha256": sha or tokenizer_fingerprint(tokenizer)}
    )
    content = RecordDict({"arrays": parameters_to_record(model), "config": config})
    return Message(content=content, dst_node_id=101, message_type=kind)


def test_train_handler_fine_tunes_and_replies_with_every_parameter(
    flower_identity, smoke_config, tokenizer, tiny_model
):
    sent = message(tiny_model, tokenizer, MessageType.TRAIN)
    reply = client_app.train(sent, context(smoke_config))
    assert not reply.has_error() and reply.metadata.reply_to_message_id == sent.metadata.message_id
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 50
    assert metrics["train-loss-last"] < metrics["train-loss-first"]  # it learned
    assert reply.content[USER_RECORD][USER_ID] == 1
    before, after = sent.content["arrays"], reply.content["arrays"]
    assert set(before) == set(after)
    assert not np.array_equal(before["lm_head.weight"].numpy(), after["lm_head.weight"].numpy())


def test_evaluate_handler_reports_loss_perplexity_and_rouge(
    flower_identity, smoke_config, tokenizer, tiny_model
):
    reply = client_app.evaluate(message(tiny_model, tokenizer, MessageType.EVALUATE), context(smoke_config))
    metrics = reply.content["metrics"]
    assert "arrays" not in reply.content
    assert metrics["num-examples"] == smoke_config.eval_max_examples
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]), rel=1e-6)
    assert 0 <= metrics["rouge2"] <= metrics["rouge1"] <= 100 and 0 <= metrics["rougeL"] <= 100
    # per held-out document: the factors, and a digest of the summary (never its text)
    documents = len(metrics["judged-utility"])
    assert documents > 0 and len(metrics["judged-length"]) == len(metrics["summary-digest"]) == documents
    assert all(0 <= d < 2**52 and float(d) == d for d in metrics["summary-digest"])
    assert not any(isinstance(v, str) for v in metrics.values())


def test_a_summary_digest_tells_equal_texts_without_the_text():
    digest = evaluation.summary_digest
    assert digest("the parser improves accuracy") == digest("the parser improves accuracy")
    assert digest("the parser improves accuracy") != digest("the parser improves accuracy.")


def test_train_handler_refuses_another_tokenizer(flower_identity, smoke_config, tokenizer, tiny_model):
    with pytest.raises(RuntimeError, match="tokenizer hash"):
        client_app.train(
            message(tiny_model, tokenizer, MessageType.TRAIN, sha="f" * 64), context(smoke_config)
        )


def test_handler_needs_its_partition_in_the_node_config(flower_identity, smoke_config, tokenizer, tiny_model):
    bad = context(smoke_config)
    bad.node_config = {}
    with pytest.raises(ValueError, match="partition-id"):
        client_app.train(message(tiny_model, tokenizer, MessageType.TRAIN), bad)


def test_training_judges_only_the_users_fresh_documents_never_the_servers_heldout(
    flower_identity, smoke_config, tokenizer, tiny_model, monkeypatch
):
    """The reward that steers aggregation comes from the user's reward documents; the server's
    held-out documents are for reporting only (evaluate replies)."""
    from flhf_core.client import evaluation
    from flhf_core.data import partitions

    judged: list[str] = []
    real = evaluation.summarize

    def spy(model, tokenizer, sources, *args, **kwargs):
        judged.extend(sources)
        return real(model, tokenizer, sources, *args, **kwargs)

    monkeypatch.setattr(evaluation, "summarize", spy)
    config = smoke_config
    corpus = load_corpus(config)
    texts = {d.doc_id: d.text for d in corpus.documents}
    heldout = {texts[d] for d in partitions.heldout_doc_ids(corpus, config)}
    reward = {texts[d] for d in partitions.user_partition(corpus, 1, 3, config).reward_doc_ids}

    client_app.train(message(tiny_model, tokenizer, MessageType.TRAIN), context(config))
    documents = {source.split(": ", 1)[1] for source in judged}
    assert documents and documents <= reward and not documents & heldout

    judged.clear()
    client_app.evaluate(message(tiny_model, tokenizer, MessageType.EVALUATE), context(config))
    assert {source.split(": ", 1)[1] for source in judged} & heldout  # reported on the held-out ones
