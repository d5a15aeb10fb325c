"""The round loop's protocol: one message per user per round, where the time goes, users with
their own data files. Whole federations in-process through the real handlers."""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, MessageType, RecordDict

from flhf_core.data import partitions
from flhf_core.data.corpus import load_corpus
from flhf_core.results.tracking import read_metrics
from flhf_core.server.main import run_federation

TIMING = ("seconds", "client-train-seconds", "client-eval-seconds", "server-eval-seconds", "setup-seconds")


def run(grid, config):
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=config.to_mapping())
    return run_federation(grid, context)


def smoke(smoke_config, tmp_path, name, **overrides):
    return smoke_config.replace(
        **{"results-dir": str(tmp_path), "run-name": name, "eval-max-examples": 6, **overrides}
    )


def kinds(grid):
    counts = {}
    for m in grid.delivered:
        counts[m.metadata.message_type] = counts.get(m.metadata.message_type, 0) + 1
    return counts


def test_train_replies_carry_the_evaluation_a_separate_round_would_give(
    flower_identity, smoke_config, tmp_path, in_process_grid
):
    """Round r's train messages bring round r-1's model; the users evaluate it there, so a round
    costs one message per user. The figures are those of separate evaluate messages, and land
    in the evaluated round's rows."""
    fused_config = smoke(smoke_config, tmp_path, "fused")
    fused = in_process_grid(fused_config.to_mapping(), users=2)
    separate_config = smoke(smoke_config, tmp_path, "separate", **{"separate-evaluation": True})
    separate = in_process_grid(separate_config.to_mapping(), users=2)
    fused_dir = run(fused, fused_config)
    fused_rows = read_metrics(fused_dir / "metrics.jsonl")
    separate_rows = read_metrics(run(separate, separate_config) / "metrics.jsonl")

    # 2 rounds, 2 users: a train message per user and round, and one evaluation of the final model
    assert kinds(fused) == {MessageType.QUERY: 2, MessageType.TRAIN: 4, MessageType.EVALUATE: 2}
    assert kinds(separate) == {MessageType.QUERY: 2, MessageType.TRAIN: 4, MessageType.EVALUATE: 4}

    def evaluations(rows):
        return {
            (r["round"], r["client"]): (r["reward"], r["rougeL"], r["win-rate"])
            for r in rows
            if r["scope"] == "client" and "win-rate" in r and r["round"] > 0
        }

    expected, got = evaluations(separate_rows), evaluations(fused_rows)
    assert set(got) == set(expected) == {(1, 0), (1, 1), (2, 0), (2, 1)}
    for key, figures in expected.items():
        assert got[key] == pytest.approx(figures, abs=1e-9), key

    for row in (r for r in fused_rows if r["scope"] == "server" and r["round"] > 0):
        assert all(row[key] > 0 for key in TIMING), row
        users = [r for r in fused_rows if r["scope"] == "client" and r["round"] == row["round"]]
        assert row["client-train-seconds"] == pytest.approx(sum(u["train-seconds"] for u in users))
        assert row["seconds"] >= row["server-eval-seconds"]

    # TensorBoard holds the federation's curves (mean and worst user) and each user's, per round
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(fused_dir / "tensorboard"))
    events.Reload()
    for tag in (
        "server/reward",
        "server/reward-worst",
        "user-0/reward",
        "user-1/reward",
        "user-1/train-loss",
    ):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    user_rows = {r["round"]: r["reward"] for r in fused_rows if r["client"] == 1 and "reward" in r}
    assert [e.value for e in events.Scalars("user-1/reward")] == pytest.approx([user_rows[1], user_rows[2]])
    # and the plots a reader looks at first
    for key in ("reward", "reward-worst", "win-rate", "reward-length", "rougeL"):
        assert (fused_dir / "plots" / f"{key}.png").is_file(), key


def test_a_user_with_its_own_data_file_trains_on_it_and_weighs_no_more_than_a_counted_user(
    flower_identity, smoke_config, tmp_path, in_process_grid
):
    config = smoke(smoke_config, tmp_path, "own", **{"num-server-rounds": 1})
    corpus = load_corpus(config)
    path = tmp_path / "user-1.jsonl"
    partitions.export_user_documents(corpus, 1, 2, config, path)

    def claim_a_billion(sent, reply):
        if not reply.has_error() and "metrics" in reply.content and reply.content["user"]["user-id"] == 1:
            reply.content["metrics"]["num-examples"] = 1e9
        return reply

    grid = in_process_grid(
        config.to_mapping(), users=2, tamper=claim_a_billion, node_configs={1: {"data-file": str(path)}}
    )
    run_dir = run(grid, config)
    splits = json.loads((run_dir / "splits.json").read_text())
    assert splits["users"]["1"] == {"own-data": True} and splits["users"]["0"]["train"]
    rows = read_metrics(run_dir / "metrics.jsonl")
    weights = {r["client"]: r["aggregation-weight"] for r in rows if "aggregation-weight" in r}
    assert weights[1] == pytest.approx(0.5)  # its claim capped at user 0's counted examples
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
