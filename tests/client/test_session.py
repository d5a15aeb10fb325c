"""What a ClientApp message builds before its work: caches per process and per node, a
user's own data file, the thread budget."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import client_app
from flhf_core.client import documents, session
from flhf_core.config import ConfigError
from flhf_core.data import partitions
from flhf_core.data.corpus import load_corpus
from flhf_core.learning.model import (
    TokenizerMismatch,
    load_hub_tokenizer,
    load_pretrained,
    parameters_to_record,
    tokenizer_fingerprint,
)


def context(config, user=0, users=2, **node_config):
    return Context(
        run_id=1,
        node_id=100 + user,
        node_config={"partition-id": user, "num-partitions": users, **node_config},
        state=RecordDict(),
        run_config=config.to_mapping(),
    )


def message(model, tokenizer):
    config = ConfigRecord(
        {"phase": "sft", "server-round": 1, "tokenizer-sha256": tokenizer_fingerprint(tokenizer)}
    )
    return Message(
        content=RecordDict({"arrays": parameters_to_record(model), "config": config}),
        dst_node_id=100,
        message_type=MessageType.TRAIN,
    )


@pytest.fixture
def counted(monkeypatch):
    """Counts of the expensive builds: corpus loads, partitions and model initializations."""
    calls = {"corpus": 0, "model": 0}
    real_corpus, real_model = documents.corpus_documents, session.build_model

    def corpus_documents(*args):
        calls["corpus"] += 1
        return real_corpus(*args)

    def build_model(*args):
        calls["model"] += 1
        return real_model(*args)

    monkeypatch.setattr(documents, "corpus_documents", corpus_documents)
    monkeypatch.setattr(session, "build_model", build_model)
    documents._user_cache.clear()
    session._initial_models.clear()
    return calls


def test_a_worker_process_builds_a_users_data_and_the_model_once(
    flower_identity, smoke_config, tokenizer, tiny_model, counted
):
    ctx = context(smoke_config)
    first = session.open_session(message(tiny_model, tokenizer), ctx)
    first.model.lm_head.weight.data.add_(1.0)  # a handler's changes never reach the cache
    second = session.open_session(message(tiny_model, tokenizer), ctx)
    assert counted == {"corpus": 1, "model": 1}
    assert second.data == first.data and second.model is not first.model
    assert second.model.lm_head.weight.equal(tiny_model.lm_head.weight)
    session.open_session(message(tiny_model, tokenizer), context(smoke_config, user=1))
    assert counted["corpus"] == 2  # another user: its own data


def test_the_initial_model_cache_tells_a_copy_attention_model_from_a_plain_one(
    smoke_config, tokenizer, tmp_path
):
    """One worker process (and one node's disk cache) serving a run with copy attention after one
    without builds the model it asks for."""
    from flhf_core.learning.copy_t5 import CopyT5ForConditionalGeneration

    session._initial_models.clear()
    node = {"state-dir": str(tmp_path)}
    plain_config = smoke_config.replace(**{"copy-attention": False})
    plain = session.initial_model(context(plain_config, **node), plain_config, tokenizer)
    copying = smoke_config.replace(**{"copy-attention": True})
    built = session.initial_model(context(copying, **node), copying, tokenizer)
    assert not isinstance(plain, CopyT5ForConditionalGeneration)
    assert isinstance(built, CopyT5ForConditionalGeneration)
    session._initial_models.clear()  # a fresh process on the same node: from the disk cache
    assert isinstance(
        session.initial_model(context(copying, **node), copying, tokenizer), CopyT5ForConditionalGeneration
    )


def test_a_fresh_process_on_a_node_reads_the_users_data_and_model_from_the_disk_cache(
    flower_identity, smoke_config, tokenizer, tiny_model, counted, tmp_path
):
    ctx = context(smoke_config, **{"state-dir": str(tmp_path)})
    built = session.open_session(message(tiny_model, tokenizer), ctx)
    documents._user_cache.clear()  # what a new process starts with
    session._initial_models.clear()
    loaded = session.open_session(message(tiny_model, tokenizer), ctx)
    assert counted == {"corpus": 1, "model": 1}  # the second process built nothing
    assert loaded.data == built.data
    assert all(
        a.tolist() == b.tolist()
        for a, b in zip(loaded.encoded_train.sources, built.encoded_train.sources, strict=True)
    )
    cached = list((tmp_path / "cache").glob("user-0-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["user"] == 0
    cached[0].write_text("{not json")  # a torn or corrupt cache file is rebuilt, never trusted
    documents._user_cache.clear()
    assert session.open_session(message(tiny_model, tokenizer), ctx).data == built.data


def test_a_user_with_its_own_data_file_reads_only_its_own_documents(
    smoke_config, tmp_path, corpus_config=None
):
    config = smoke_config
    corpus = load_corpus(config)
    path = tmp_path / "user-1.jsonl"
    written = partitions.export_user_documents(corpus, 1, 2, config, path)
    own = documents.file_documents(config, 1, path)
    file_ids = {json.loads(line)["id"] for line in path.read_text().splitlines()}
    assert written == len(file_ids) and own.own_data
    for kind in ("train", "validation", "feedback", "reward", "report"):
        examples = getattr(own, kind)
        assert examples and {e.doc_id for e in examples} <= file_ids, kind
    assert not {e.doc_id for e in own.train} & {e.doc_id for e in own.report + own.reward + own.validation}
    assert not file_ids & set(partitions.heldout_doc_ids(corpus, config))  # never the server's held-out ones
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(ConfigError, match="too few"):
        documents.file_documents(config, 1, tiny)
    with pytest.raises(ConfigError, match="highlight-supervision"):  # a file carries no highlights
        documents.file_documents(config.replace(**{"highlight-supervision": True}), 1, path)
    extracting = documents.file_documents(config.replace(extractor="highlights"), 1, path)
    reading_all = documents.file_documents(config.replace(extractor="none"), 1, path)
    for example in extracting.train[:5]:  # a file's text is split at sentence ends, then extracted
        whole = next(e for e in reading_all.train if (e.doc_id, e.aspect) == (example.doc_id, example.aspect))
        assert example.document != whole.document and example.document in whole.document


def test_thread_budget_comes_from_the_node_then_the_engine(monkeypatch, smoke_config):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert session.thread_budget(context(smoke_config)) == 3  # what Ray gave the worker
    assert session.thread_budget(context(smoke_config, **{"torch-threads": 1})) == 1
    with pytest.raises(ConfigError, match="torch-threads"):
        session.thread_budget(context(smoke_config, **{"torch-threads": "many"}))
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # OpenMP's nested form: not ours to refuse
    assert session.thread_budget(context(smoke_config)) >= 1


@pytest.mark.parametrize("run_name", ["../../elsewhere", "a/b", "..", ".hidden", ""])
def test_a_run_name_from_the_server_that_is_no_plain_name_is_refused(
    flower_identity, smoke_config, tokenizer, tiny_model, tmp_path, run_name
):
    """The server's run name becomes a folder under the node's state-dir: it may not reach out."""
    sent = message(tiny_model, tokenizer)
    sent.content["config"]["run-name"] = run_name
    with pytest.raises(ConfigError, match="not a plain folder name"):
        session.open_session(sent, context(smoke_config, **{"state-dir": str(tmp_path / "state")}))
    assert not (tmp_path / "elsewhere").exists()


def test_a_data_file_exported_under_another_seed_is_refused_by_name(smoke_config, tmp_path):
    corpus = load_corpus(smoke_config)
    path = tmp_path / "user-1.jsonl"
    partitions.export_user_documents(corpus, 1, 2, smoke_config.replace(seed=7), path)
    with pytest.raises(ConfigError, match="exported with seed=7, this run has seed=42"):
        documents.file_documents(smoke_config, 1, path)
    other = smoke_config.replace(**{"heldout-fraction": 0.3})
    partitions.export_user_documents(corpus, 1, 2, smoke_config, path)
    with pytest.raises(ConfigError, match=r"heldout-fraction=0\.2, this run has heldout-fraction=0\.3"):
        documents.file_documents(other, 1, path)


def test_a_users_own_file_never_trains_on_the_servers_heldout_documents(smoke_config, tmp_path):
    """A hand-made file (no export stamp) that holds documents the server holds out: by id, they
    are only ever among the user's held-out (reporting) documents, never learned from or judged on
    to steer."""
    corpus = load_corpus(smoke_config)
    heldout = set(partitions.heldout_doc_ids(corpus, smoke_config))
    rows = [{"id": d.doc_id, "document": d.text, **dict(d.summaries)} for d in corpus.documents[100:220]]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert heldout & {row["id"] for row in rows}  # the file holds some
    docs = documents.file_documents(smoke_config, 0, path)
    used = {e.doc_id for kind in ("train", "validation", "feedback", "reward") for e in getattr(docs, kind)}
    assert used and not used & heldout


# --------------------------------------------------------------------------
# model-path: a node without hub access loads the run's hub model from a folder
# --------------------------------------------------------------------------
HUB_NAME = "google/flan-t5-small"  # what the run names; in no cache here, and the hub is out of reach


@pytest.fixture
def offline(monkeypatch):
    """No hub: looking a name up fails at once (instead of retrying for a minute)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def hub_run(smoke_config, tmp_path):
    short = {"max-source-tokens": 48, "max-target-tokens": 16, "max-new-tokens": 8, "eval-max-examples": 2}
    return smoke_config.replace(model=HUB_NAME, **{"results-dir": str(tmp_path / "results"), **short})


def test_a_node_without_hub_access_serves_a_round_from_its_model_path(
    flower_identity, smoke_config, hub_checkpoint, offline, tmp_path
):
    """The run names a hub checkpoint; the server has its copy, the user's node another (its
    ``model-path``). The server's tokenizer hash fits the node's copy, and the user trains."""
    served = hub_checkpoint("flan-t5")
    own = shutil.copytree(served, tmp_path / "flan-t5-small")
    config = hub_run(smoke_config, tmp_path)
    model = load_pretrained(served)
    sent = message(model, load_hub_tokenizer(str(served)))
    answer = client_app.train(sent, context(config, **{"model-path": str(own), "torch-threads": 1}))
    assert math.isfinite(answer.content["metrics"]["train-loss"])
    assert set(answer.content["arrays"]) == set(parameters_to_record(model))
    # the same node without model-path looks the name up, and cannot reach the hub
    with pytest.raises(ConfigError, match=f"model: cannot load a tokenizer for '{HUB_NAME}'"):
        session.open_session(sent, context(config))


def test_model_path_is_checked_and_its_tokenizer_is_cached_by_path(
    smoke_config, hub_checkpoint, offline, tmp_path
):
    config = hub_run(smoke_config, tmp_path)
    right, wrong = hub_checkpoint("flan-t5"), hub_checkpoint("bart")
    sha = tokenizer_fingerprint(load_hub_tokenizer(str(right)))
    source = session.model_source(context(config, **{"model-path": str(right)}), config)
    assert source == str(right) and session.cached_tokenizer(config, source, sha, b"")
    # a folder with another checkpoint: its tokenizer is not the server's (not the one cached above)
    other = session.model_source(context(config, **{"model-path": str(wrong)}), config)
    with pytest.raises(TokenizerMismatch):
        session.cached_tokenizer(config, other, sha, b"")
    with pytest.raises(ConfigError, match=r"node config model-path: .* is not a folder"):
        session.model_source(context(config, **{"model-path": str(tmp_path / "absent")}), config)
    assert session.model_source(context(config), config) == HUB_NAME
    # a tiny-t5 is built from the run config, never loaded
    assert (
        session.model_source(context(smoke_config, **{"model-path": str(right)}), smoke_config) == "tiny-t5"
    )


def test_an_own_file_holds_out_what_the_server_holds_out_for_any_dataset(smoke_config, tmp_path):
    """The server's test split of a hub dataset, and the documents its hash holds out where its
    dataset has no test split, are never learned from or judged to steer by a user whose own
    file holds them (with or without a split column of its own)."""

    def rows(n, **extra):
        return [
            {
                "id": f"d{i}",
                "document": f"paper {i} studies topic {i % 5}.",
                "summary": f"topic {i % 5}",
                **extra,
            }
            for i in range(n)
        ]

    def write(path, table):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in table))
        return path

    def used(config, own):
        docs = documents.file_documents(config, 0, own)
        return {
            e.doc_id for kind in ("train", "validation", "feedback", "reward") for e in getattr(docs, kind)
        }

    hub = tmp_path / "hub"
    write(hub / "train.jsonl", rows(60)[:40])
    write(hub / "test.jsonl", rows(60)[40:])
    official = smoke_config.replace(dataset=f"hf:{hub}")
    server = set(partitions.heldout_doc_ids(load_corpus(official), official))
    assert server == {f"d{i}" for i in range(40, 60)}
    mine = used(official, write(tmp_path / "mine.jsonl", rows(60)))  # no split column
    assert mine and not mine & server

    by_hash = smoke_config.replace(dataset=str(write(tmp_path / "plain.jsonl", rows(60))))
    server = set(partitions.heldout_doc_ids(load_corpus(by_hash), by_hash))
    assert server  # the server's dataset has no test split: held out by hash
    labelled = write(tmp_path / "labelled.jsonl", rows(60, split="train"))  # claims all are training rows
    mine = used(by_hash, labelled)
    assert mine and not mine & server
