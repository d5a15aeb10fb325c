"""The baseline run modes on the feedback-smoke preset, in process (the real ServerApp loop and
ClientApp handlers): each trains, and reports the same keys as a federated run."""

from __future__ import annotations

import json

import pytest
from conftest import SHORT_TEXTS
from safetensors import safe_open
from safetensors.numpy import load_file

from flhf_core.client import personal, reward_state
from flhf_core.config import RunConfig
from flhf_core.results.tracking import read_metrics
from flhf_core.runs import cli
from flhf_core.runs.inprocess import run_in_process
from flhf_core.server.reward_pool import RewardModelPool

# the figures a table of methods reads from every run (bench/quality.py)
COMPARED = ("reward", "reward-worst", "reward-std", "win-rate", "bytes-up", "bytes-down", "seconds")


BUDGET = 6  # the federated run's ratings-per-round: a document's 4 samples and half of another's
# ... with clustered reward models (2 clusters) and active queries, for 2 feedback rounds (the
# second is the first in which users receive the clusters' models and score them), the gate
# off so that the learned rewards reach PPO (tests/results/test_resume.py runs with the gate on)
REWARD_MODELS = (
    f"ratings-per-round={BUDGET}",
    "reward-model=clustered",
    "reward-queries=active",
    "reward-model-trust=0",
)


def smoke_run(results, mode: str, *extra: str):
    items = [f"mode={mode}", *SHORT_TEXTS, f"results-dir={results}", f"run-name={mode}", *extra]
    return run_in_process(RunConfig.from_mapping(cli.merged_config("feedback-smoke", items)), 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = tmp_path_factory.mktemp("baselines")
    return {
        "federated": smoke_run(results, "federated", *REWARD_MODELS, "num-server-rounds=3"),
        "local-only": smoke_run(results, "local-only"),
        "centralized": smoke_run(results, "centralized"),
    }


def test_the_feedback_budget_is_kept_and_clustered_reward_models_score_the_rest(runs):
    """Issue 13: ``train-ratings-used`` on every training row; none in supervised rounds, and
    within ``ratings-per-round`` in each feedback round (of 2 x 4 x 4 = 32 samples). Each user's
    judgements stay in its state folder; its reward model travels (the feedback rounds' bytes
    up); the first assignment is the seed's, and the second feedback round reports the users'
    cluster losses (clusters changed, maybe 0) and what active queries chose."""
    rows = [r for r in read_metrics(runs["federated"] / "metrics.jsonl") if r["round"] > 0]
    trained = [r for r in rows if r["scope"] == "server" or "train-examples" in r]
    assert {r["scope"] for r in trained} == {"client", "server"} and len(trained) == 9
    for row in trained:
        used = row["train-ratings-used"]
        assert used == 0 if row["phase"] == "sft" else 0 < used <= BUDGET, row
        if row["phase"] == "feedback":
            assert -1.0 <= row["reward-model-gap"] <= 1.0, row
        else:
            assert "reward-model-gap" not in row
    for user in (0, 1):
        with safe_open(
            str(runs["federated"] / "users" / f"user-{user}" / reward_state.STATE_FILE), "np"
        ) as kept:
            judged = json.loads(kept.metadata()["judgements"])
        used = [
            r["train-ratings-used"] for r in trained if r.get("client") == user and r["phase"] == "feedback"
        ]
        assert len(judged["ratings"]) == sum(used) and len(used) == 2
    server = {r["round"]: r for r in trained if r["scope"] == "server"}
    assert server[2]["bytes-up"] > server[1]["bytes-up"]  # the reward models went up too
    assert server[3]["bytes-down"] > server[2]["bytes-down"]  # ... and the clusters' came down
    seed = json.loads((runs["federated"] / "config.json").read_text())["seed"]
    first = RewardModelPool(clusters=2, seed=seed)
    first.assign([0, 1])
    used = {
        (r["round"], r["client"]): r["reward-model-cluster"]
        for r in trained
        if r["scope"] == "client" and r["phase"] == "feedback"
    }
    assert {u: used[(2, u)] for u in (0, 1)} == first.assignment  # the seed's, one user each
    # no user had judged anything before round 2, so none reported losses: nobody moved
    assert server[2]["reward-model-clusters-changed"] == 0
    assert {u: used[(3, u)] for u in (0, 1)} == first.assignment
    # in round 3 both had, and reported both clusters' losses: a balanced move swaps both or none
    assert server[3]["reward-model-clusters-changed"] in (0.0, 2.0)
    assert "reward-model-queried-spread" in server[3]
    # the gate off: the models scored at every step once their users had judged something
    assert all(
        r["reward-model-trusted"] == 1.0 for r in trained if r["round"] == 3 and r["scope"] == "client"
    )


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("mode", ["local-only", "centralized"])
def test_a_baseline_reports_what_a_federated_run_reports(runs, mode):
    federated, baseline = summary(runs["federated"]), summary(runs[mode])
    assert baseline["status"] == "completed"
    for key in COMPARED:
        assert key in federated and baseline.get(key) is not None, key
    judged = json.loads((runs[mode] / "judgements.json").read_text())
    theirs = json.loads((runs["federated"] / "judgements.json").read_text())
    assert judged["round"] == 2 and sorted(judged["users"]) == ["0", "1"]
    for user, figures in judged["users"].items():  # the same documents, so runs compare one by one
        assert figures["doc-ids"] == theirs["users"][user]["doc-ids"]
        assert len(figures["judged-utility"]) == len(figures["doc-ids"]) > 0
        assert all(0.0 <= u <= 1.0 for u in figures["judged-utility"])


def test_local_only_sends_nothing_and_each_user_keeps_its_own_model(runs):
    run_dir = runs["local-only"]
    server_rows = [
        r for r in read_metrics(run_dir / "metrics.jsonl") if r["scope"] == "server" and r["round"]
    ]
    assert server_rows and all(r["bytes-up"] == 0 and r["bytes-down"] == 0 for r in server_rows)
    assert not (run_dir / "model").exists()  # no global model exists
    states = [load_file(run_dir / "users" / f"user-{u}" / personal.STATE_FILE) for u in (0, 1)]
    initial = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text()))
    assert initial.mode == "local-only"
    # the whole model is each user's own, and the two users' models differ
    assert set(states[0]) == set(states[1]) and len(states[0]) > 10
    assert any((states[0][k] != states[1][k]).any() for k in states[0])
    user_rows = [
        r for r in read_metrics(run_dir / "metrics.jsonl") if r["scope"] == "client" and r["round"] == 2
    ]
    assert {r["client"] for r in user_rows} == {0, 1} and all("reward" in r for r in user_rows)
    # round 2 builds on each user's own round-1 model, not on a fresh one
    assert all(r["train-state-from-context"] == 1.0 for r in user_rows if "train-state-from-context" in r)
    assert sum("train-state-from-context" in r for r in user_rows) == 2


def test_centralized_has_one_learner_holding_every_users_data_and_every_user_evaluates(runs):
    rows = read_metrics(runs["centralized"] / "metrics.jsonl")
    federated = read_metrics(runs["federated"] / "metrics.jsonl")
    trained = {r["client"] for r in rows if r["scope"] == "client" and "train-examples" in r}
    evaluated = {(r["round"], r["client"]) for r in rows if r["scope"] == "client" and "reward" in r}
    assert trained == {0}
    assert evaluated == {(1, 0), (1, 1), (2, 0), (2, 1)}
    # the learner's supervised round holds both users' training examples
    pooled = next(r for r in rows if r["scope"] == "client" and r["round"] == 1 and "train-examples" in r)
    alone = [
        r["train-examples"]
        for r in federated
        if r["scope"] == "client" and r["round"] == 1 and "train-examples" in r
    ]
    assert pooled["train-examples"] == sum(alone)
    # and every user's feedback documents
    feedback = next(r for r in rows if r["scope"] == "client" and r["round"] == 2 and "train-examples" in r)
    assert feedback["train-examples"] == sum(
        r["train-examples"]
        for r in federated
        if r["scope"] == "client" and r["round"] == 2 and "train-examples" in r
    )
