"""The ServerApp: its pure helpers, and whole federations run in-process through the real handlers."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from flwr.app import Error, Message, MessageType

from flhf_core.config import RunConfig
from flhf_core.data import partitions
from flhf_core.data.corpus import load_corpus
from flhf_core.learning.model import load_pretrained
from flhf_core.results.tracking import read_metrics
from flhf_core.runs import cli
from flhf_core.server.main import RoundFailed, round_learning_rate, run_federation
from flhf_core.server.reporting import reward_summary, run_summary, user_spread


def test_cosine_schedule_decays_to_a_tenth_and_constant_stays():
    config = RunConfig(num_server_rounds=6, learning_rate=1e-3, lr_schedule="cosine")
    rates = [round_learning_rate(config, r) for r in range(1, 7)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert round_learning_rate(config.replace(**{"lr-schedule": "constant"}), 5) == 1e-3


def test_user_spread_reports_mean_worst_and_spread():
    users = {
        0: {"reward": 0.1, "reward-length": 0.5, "win-rate": 0.4},
        1: {"reward": 0.3, "reward-length": 0.9, "win-rate": 0.8},
    }
    spread = user_spread(users)
    assert spread["reward"] == pytest.approx(0.2) and spread["reward-worst"] == 0.1
    assert spread["reward-best"] == 0.3 and spread["reward-std"] == pytest.approx(0.1)
    assert spread["reward-length"] == pytest.approx(0.7) and spread["win-rate"] == pytest.approx(0.6)
    assert user_spread({}) == {}


def test_reward_summary_compares_feedback_rounds_with_the_last_supervised_round():
    rows = [
        {"round": 1, "phase": "sft", "reward": 0.10, "reward-worst": 0.05},
        {"round": 2, "phase": "sft", "reward": 0.12, "reward-worst": 0.06},
        {"round": 3, "phase": "feedback", "reward": 0.15, "reward-worst": 0.09, "win-rate": 0.7},
    ]
    summary = reward_summary(rows, sft_rounds=2)
    assert summary["reward-after-sft"] == 0.12 and summary["reward"] == 0.15
    assert summary["reward-gain-from-feedback"] == pytest.approx(0.03)
    assert "reward-after-sft" not in reward_summary(rows[:2], sft_rounds=2)  # no feedback rounds


# --------------------------------------------------------------------------
# Whole federations in-process: the real ServerApp loop and ClientApp handlers
# --------------------------------------------------------------------------
def run_in_process(grid, config):
    from flwr.app import Context, RecordDict

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=config.to_mapping())
    return run_federation(grid, context)


def in_process_config(smoke_config, tmp_path, **overrides):
    return smoke_config.replace(
        **{
            "results-dir": str(tmp_path),
            "run-name": "run",
            "num-server-rounds": 1,
            "eval-max-examples": 4,
            **overrides,
        }
    )


def claim_a_billion_examples(sent, reply):
    """User 0 lies about its number of examples."""
    if reply.has_error() or "metrics" not in reply.content or reply.content["user"]["user-id"] != 0:
        return reply
    reply.content["metrics"]["num-examples"] = 1e9
    return reply


def test_a_federation_identifies_its_users_writes_splits_and_weighs_by_counted_examples(
    flower_identity, smoke_config, tmp_path, in_process_grid
):
    config = in_process_config(smoke_config, tmp_path, **{"min-available-nodes": 3})
    grid = in_process_grid(config.to_mapping(), users=3, tamper=claim_a_billion_examples)
    run_dir = run_in_process(grid, config)

    splits = json.loads((run_dir / "splits.json").read_text())
    assert set(splits["users"]) == {"0", "1", "2"} and splits["heldout"]
    query = [m for m in grid.delivered if m.metadata.message_type == MessageType.QUERY]
    assert sorted(m.metadata.dst_node_id for m in query) == sorted(grid.get_node_ids())  # asked once each

    rows = read_metrics(run_dir / "metrics.jsonl")
    weights = {r["client"]: r["aggregation-weight"] for r in rows if "aggregation-weight" in r}
    corpus = load_corpus(config)
    counts = [len(partitions.user_partition(corpus, u, 3, config).train) for u in range(3)]
    assert weights[0] == pytest.approx(counts[0] / sum(counts))  # the lie bought nothing
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and (run_dir / "model" / "config.json").is_file()


def test_a_round_without_a_valid_reply_fails_the_run_and_keeps_what_came_before(
    flower_identity, smoke_config, tmp_path, in_process_grid
):
    def break_round_two(sent, reply):
        if sent.metadata.message_type == MessageType.TRAIN and sent.content["config"]["server-round"] == 2:
            return Message(Error(code=0, reason="client crashed"), reply_to=sent)
        return reply

    config = in_process_config(smoke_config, tmp_path, **{"num-server-rounds": 3})
    grid = in_process_grid(config.to_mapping(), users=2, tamper=break_round_two)
    with pytest.raises(RoundFailed, match=r"round 2: no valid training reply.*client crashed"):
        run_in_process(grid, config)

    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed-in-round"] == 2
    assert "client crashed" in summary["error"] and summary["rounds"] == 1
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows if r["scope"] == "server"] == [0, 1]  # round 1 is kept
    assert {r["client"] for r in rows if r.get("failed") and r["round"] == 2} == {0, 1}
    saved = load_pretrained(run_dir / "model")  # the last good global model: round 1's
    round_one = load_pretrained(run_dir / "checkpoints" / "latest")
    assert (run_dir / "checkpoints" / "latest" / "round.txt").read_text().strip() == "1"
    for a, b in zip(saved.parameters(), round_one.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_exception_inside_a_round_is_recorded_and_raised(
    flower_identity, smoke_config, tmp_path, in_process_grid
):
    class BrokenGrid(in_process_grid):
        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == MessageType.EVALUATE:
                raise ConnectionError("the SuperLink went away")
            return super().send_and_receive(messages, timeout)

    config = in_process_config(smoke_config, tmp_path)
    with pytest.raises(ConnectionError):
        run_in_process(BrokenGrid(config.to_mapping(), users=2), config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "ConnectionError: the SuperLink went away" in summary["error"]
    assert summary["failed-in-round"] == 1  # the final evaluation of a 1-round run: a real round


def test_a_failure_after_aggregation_saves_the_last_completed_rounds_model(
    flower_identity, smoke_config, tmp_path, in_process_grid, monkeypatch
):
    """Round 2 aggregates, then its evaluation fails: model/ is round 1's, not round 2's
    unrecorded average."""
    from flhf_core.server import federation

    calls = []
    real = federation.server_evaluate

    def fails_in_round_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # round 0, round 1, then round 2
            raise RuntimeError("the held-out evaluation broke")
        return real(*args, **kwargs)

    monkeypatch.setattr(federation, "server_evaluate", fails_in_round_two)
    config = in_process_config(smoke_config, tmp_path, **{"num-server-rounds": 2})
    with pytest.raises(RuntimeError, match="held-out evaluation broke"):
        run_in_process(in_process_grid(config.to_mapping(), users=2), config)
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed-in-round"] == 2
    assert (run_dir / "checkpoints" / "latest" / "round.txt").read_text().strip() == "1"
    saved, round_one = load_pretrained(run_dir / "model"), load_pretrained(run_dir / "checkpoints" / "latest")
    for a, b in zip(saved.parameters(), round_one.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_summary_is_written_when_the_last_rounds_were_not_evaluated():
    """evaluate-every=2 with 3 supervised rounds of 4: round 3 has no reward; a failed run may
    end on a round without evaluation. The summary uses the last evaluated rows and says so."""
    config = {"lead-words": 25, "sft-rounds": 3}
    baselines = {"baseline-lead25-rougeL": 17.0}
    rows = [
        {"round": 1, "phase": "sft", "scope": "server", "failures": 0},
        {"round": 2, "phase": "sft", "scope": "server", "rougeL": 10.0, "reward": 0.10, "reward-worst": 0.05},
        {"round": 3, "phase": "sft", "scope": "server", "failures": 0},
        {
            "round": 4,
            "phase": "feedback",
            "scope": "server",
            "rougeL": 12.0,
            "reward": 0.2,
            "reward-worst": 0.1,
        },
    ]
    summary = run_summary(rows, config, baselines, {"rougeL": 5.0})
    assert summary["reward-after-sft"] == 0.10 and summary["reward-after-sft-round"] == 2
    assert summary["evaluated-round"] == 4 and "note" not in summary
    failed = run_summary(rows[:3], config, baselines, {"rougeL": 5.0})
    assert failed["evaluated-round"] == 2 and failed["rougeL"] == 10.0
    assert "round 3's model was not evaluated" in failed["note"]


def test_local_head_publishes_and_reports_no_global_model(
    flower_identity, smoke_config, tmp_path, in_process_grid
):
    # supervised rounds of one user of two each (sft-fraction-train): the same work as one full round
    overrides = {"personalization": "local-head", "num-server-rounds": 2, "sft-fraction-train": 0.5}
    config = in_process_config(smoke_config, tmp_path, **overrides)
    run_dir = run_in_process(in_process_grid(config.to_mapping(), users=2), config)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global-model"].startswith("none: under personalization=local-head")
    assert summary["rougeL"] is None and "reward" not in summary and summary["reward-personal"] > 0
    assert not (run_dir / "model").exists()
    server = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["scope"] == "server"]
    assert all("rougeL" not in r and "reward" not in r for r in server)
    assert [r["clients"] for r in server if r["round"] > 0] == [1, 1]
    assert server[-1]["client-rougeL-personal"] > 0 and server[-1]["reward-personal"] > 0
    text = tmp_path / "paper.txt"
    text.write_text("We propose a parser for long sentences. It improves accuracy by 2 points.")
    assert cli.main(["summarize", str(run_dir), str(text)]) == 2  # no global model to summarize with
    assert cli.main(["summarize", str(run_dir), str(text), "--user", "1"]) == 0  # body + user 1's head


def test_a_node_claiming_a_user_another_node_holds_serves_no_user_and_is_never_sampled(
    flower_identity, smoke_config, tmp_path, in_process_grid
):
    """User 2's node says it is user 0 (whose node answered first): it keeps no user, the real
    user 0 trains, and sampling never falls back to the impostor's node id."""

    def impersonate(sent, reply):
        query = sent.metadata.message_type == MessageType.QUERY and not reply.has_error()
        if query and reply.content["user"]["user-id"] == 2:
            reply.content["user"]["user-id"] = 0
        return reply

    config = in_process_config(
        smoke_config,
        tmp_path,
        **{"min-available-nodes": 2, "heldout-max-examples": 8, "eval-max-examples": 2},
    )
    grid = in_process_grid(config.to_mapping(), users=3, tamper=impersonate)
    run_dir = run_in_process(grid, config)
    impostor = grid.get_node_ids()[2]
    trained = {m.metadata.dst_node_id for m in grid.delivered if m.metadata.message_type == MessageType.TRAIN}
    assert impostor not in trained and len(trained) == 2
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert {r["client"] for r in rows if r["scope"] == "client" and "train-loss" in r} == {0, 1}


def test_every_row_started_from_one_supervised_run_gets_its_model_and_a_foreign_one_is_refused(
    smoke_config, tokenizer, tmp_path
):
    """init-from: rows of one seed (here two algorithms) start from the same saved global model."""
    from flhf_core.config import ConfigError
    from flhf_core.learning.model import build_model, canonical_parameters
    from flhf_core.server.state import prepare

    trained = build_model(smoke_config, tokenizer)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))  # anything but a fresh build
    trained.save_pretrained(tmp_path / "sft" / "model")
    tokenizer.save_pretrained(tmp_path / "sft" / "model")
    saved = canonical_parameters(trained)
    for algorithm in ("reinforce", "dpo"):
        row = smoke_config.replace(
            **{"init-from": str(tmp_path / "sft"), "feedback-algorithm": algorithm, "sft-rounds": 0}
        )
        started = canonical_parameters(prepare(row).model)
        assert all(torch.equal(started[name], saved[name]) for name in saved), algorithm
    with pytest.raises(ConfigError, match="not this run's model"):
        prepare(smoke_config.replace(**{"init-from": str(tmp_path / "sft"), "tiny-t5-size": "m"}))
    with pytest.raises(ConfigError, match="holds no global model"):
        prepare(smoke_config.replace(**{"init-from": str(tmp_path)}))
