"""The learned reward model (issue 13): its losses and diagnostics by hand, and that it learns."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from safetensors import safe_open
from safetensors.numpy import save_file

from flhf_core.client import reward_state as rs
from flhf_core.learning import reward_model as rm

SEED = int(os.environ.get("FLHF_TEST_SEED", "0"))  # rerun with other seeds to check robustness


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_bradley_terry_loss_by_hand():
    loss = rm.bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    expected = -(math.log(sigmoid(1.0)) + math.log(sigmoid(-2.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_rating_loss_is_on_the_ratings_scale():
    loss = rm.rating_loss(torch.tensor([0.0, math.log(3.0)]), torch.tensor([0.5, 0.25]))
    assert loss.item() == pytest.approx((0.0**2 + 0.5**2) / 2, rel=1e-6)  # sigmoid(log 3) = 0.75


def test_diagnostics_by_hand():
    predicted = [0.2, 0.4, 0.1, 0.9, 0.5]
    utility = [0.1, 0.3, 0.3, 0.2, 0.2]
    groups = ["a", "a", "a", "b", "b"]
    # group a: (0, 1) agree, (0, 2) disagree, (1, 2) tie (skipped); group b: a tie: 1 of 2
    found = rm.diagnostics(predicted, utility, groups)
    assert found["reward-model-accuracy"] == pytest.approx(0.5)
    assert found["reward-model-gap"] == pytest.approx(np.mean(predicted) - np.mean(utility))
    assert found["reward-model-score"] - found["reward-model-utility"] == pytest.approx(
        found["reward-model-gap"]
    )
    assert found["reward-model-utility"] == pytest.approx(0.22)
    assert found["reward-model-correlation"] == pytest.approx(np.corrcoef(predicted, utility)[0, 1])
    assert math.isnan(rm.pairwise_accuracy([1, 2], [0.5, 0.5], ["a", "a"]))
    assert rm.pairwise_accuracy([0.5, 0.5], [0.1, 0.2], ["a", "a"]) == 0.5  # indifferent: chance
    assert math.isnan(rm.correlation([1, 1], [0.1, 0.2]))


def test_a_fresh_reward_model_is_indifferent_and_never_shares_the_summarizers_weights(tiny_model, tokenizer):
    model = rm.RewardModel.from_summarizer(tiny_model)
    found = rm.scores(model, tokenizer, ["we parse text", "we parse text"], ["a parser", "nothing"], 64)
    assert torch.equal(found, torch.zeros(2))
    summarizer = {p.data_ptr() for p in tiny_model.parameters()}
    assert not summarizer & {p.data_ptr() for p in model.parameters()}


def test_fitting_learns_what_the_user_prefers(tiny_model, tokenizer):
    """Ratings and choices that favour summaries naming the parser: after fitting, unseen
    summaries that do are scored above those that do not, on unseen documents (every summary
    five words long, so only the content can tell them apart). What the model can represent,
    with every parameter at one rate: the configured fit only nudges the content weights."""
    torch.manual_seed(SEED)
    model = rm.RewardModel.from_summarizer(tiny_model)
    documents = [f"we propose a parser for language {k} and test it on treebanks" for k in range(8)]
    good, bad = "a parser for the language", "results on the weather today"
    judged = rm.Judgements(
        rated=[(d, good, 0.8) for d in documents[:4]] + [(d, bad, 0.1) for d in documents[:4]],
        chosen=[(d, good, bad) for d in documents[4:6]],
    )
    assert len(judged) == 10
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = rm.fit(model, tokenizer, judged, steps=40, optimizer=optimizer, max_tokens=64)
    assert losses["rating-loss"] < 0.05 and losses["pair-loss"] < 0.3
    with torch.no_grad():
        unseen = documents[6:]
        better = rm.scores(model, tokenizer, unseen, ["the parser of the language"] * 2, 64)
        worse = rm.scores(model, tokenizer, unseen, ["the weather results of today"] * 2, 64)
    assert (better > worse).all()
    fresh = rm.RewardModel.from_summarizer(tiny_model)
    assert rm.judgement_loss(model, tokenizer, judged, 64) < rm.judgement_loss(fresh, tokenizer, judged, 64)


def test_the_head_learns_a_preferred_length_from_a_few_judgements(tiny_model, tokenizer):
    """Mean pooling hides a summary's length; the head sees it. A user who likes ~15-word
    summaries prefers them, in 12 pairs, to shorter or longer ones of the same random words;
    at the configured rates and the steps a feedback round takes, the model then orders
    unseen pairs on unseen documents as that user would."""
    from flhf_core.config import RunConfig

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    words = [
        "model",
        "data",
        "parser",
        "results",
        "language",
        "method",
        "task",
        "corpus",
        "training",
        "score",
    ]

    def summary(length: int) -> str:
        return " ".join(rng.choice(words) for _ in range(length))

    documents = [f"we study document {k} and its parser" for k in range(20)]
    chosen = [(d, summary(15), summary(rng.choice([5, 30, 40]))) for d in documents[:12]]
    defaults = RunConfig()
    model = rm.RewardModel.from_summarizer(tiny_model)
    optimizer = rm.optimizer(
        model, defaults.reward_model_learning_rate, defaults.reward_model_length_learning_rate
    )
    rm.fit(model, tokenizer, rm.Judgements([], chosen), steps=40, optimizer=optimizer, max_tokens=64)
    unseen = [(d, summary(16), summary(rng.choice([6, 28, 38]))) for d in documents[12:]]
    assert rm.agreement(model, tokenizer, unseen, 64) == [1.0] * 8
    assert rm.length_features(["one two three", ""]).shape == (2, len(rm.LENGTH_CENTERS))


def test_the_optimizer_fits_the_length_profile_fast_and_nudges_the_rest(tiny_model):
    """Every parameter in exactly one group: the head's length weights and offset at the length
    rate, the encoder and the content weights at the other."""
    model = rm.RewardModel.from_summarizer(tiny_model)
    slow, fast = rm.optimizer(model, 1e-4, 3e-2).param_groups
    assert (slow["lr"], fast["lr"]) == (1e-4, 3e-2)
    assert {id(p) for p in fast["params"]} == {id(model.head.length.weight), id(model.head.length.bias)}
    assert {id(p) for p in slow["params"]} == {id(p) for p in model.parameters()} - {
        id(p) for p in fast["params"]
    }
    assert len(slow["params"]) + len(fast["params"]) == len(list(model.parameters()))


def test_judgement_loss_by_hand(tiny_model, tokenizer):
    """With a constant score b: each rating s costs (sigmoid(b) - s)^2, each pair log 2 (it
    cannot tell the two apart); the loss is their mean over judgements, however batched."""
    model = rm.RewardModel.from_summarizer(tiny_model)
    torch.nn.init.constant_(model.head.length.bias, 0.7)
    judged = rm.Judgements(
        rated=[("doc a", "one", 0.9), ("doc b", "two", 0.2), ("doc c", "three", 0.5)],
        chosen=[("doc a", "one", "two")],
    )
    expected = (sum((sigmoid(0.7) - s) ** 2 for s in (0.9, 0.2, 0.5)) + math.log(2)) / 4
    assert rm.judgement_loss(model, tokenizer, judged, 64) == pytest.approx(expected, rel=1e-5)
    assert rm.judgement_loss(model, tokenizer, judged, 64, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert rm.judgement_loss(model, tokenizer, rm.Judgements([], []), 64) == 0.0


def test_kept_state_is_restored_only_by_a_later_round_and_a_bad_file_is_set_aside(tiny_model, tmp_path):

    def context():
        return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    model = rm.RewardModel.from_summarizer(tiny_model)
    torch.nn.init.constant_(model.head.length.bias, 0.25)
    judged = rm.Judgements(
        rated=[("doc", "a summary", 0.7)], chosen=[("doc", "good", "bad")], checks=[1.0, 0.5]
    )
    rs.keep(context(), tmp_path, model, judged, server_round=3)
    # a new process (a fresh Context) reads the file; round 3 itself (a replay) does not
    found, again = rs.restore(context(), tmp_path, tiny_model, server_round=4)
    assert found.head.length.bias.item() == pytest.approx(0.25) and again == judged
    fresh, none = rs.restore(context(), tmp_path, tiny_model, server_round=3)
    assert fresh.head.length.bias.item() == 0.0 and len(none) == 0
    # a file written before the gate kept no checks: read with none, not set aside
    before_the_gate = rs.judgements_to_mapping(judged)
    del before_the_gate["checks"]
    metadata = {"judgements": json.dumps(before_the_gate), "round": "3"}
    with safe_open(str(tmp_path / rs.STATE_FILE), "np") as kept:
        arrays = {key: kept.get_tensor(key) for key in kept.keys()}  # noqa: SIM118
    save_file(arrays, str(tmp_path / rs.STATE_FILE), metadata=metadata)
    _, older = rs.restore(context(), tmp_path, tiny_model, server_round=4)
    assert older.rated == judged.rated and older.checks == []
    (tmp_path / rs.STATE_FILE).write_bytes(b"not a safetensors file")
    fresh, none = rs.restore(context(), tmp_path, tiny_model, server_round=4)
    assert len(none) == 0 and (tmp_path / "reward-model.safetensors.corrupt").is_file()


def test_a_replayed_round_restores_the_reward_model_from_before_it(tiny_model, tmp_path):
    """Resume: the server replays rounds after its checkpoint; round r restores the newest
    version from before r, and training r again replaces the killed attempt's version."""

    def context():
        return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def kept(bias, server_round, rated):
        model = rm.RewardModel.from_summarizer(tiny_model)
        torch.nn.init.constant_(model.head.length.bias, bias)
        judged = rm.Judgements(rated=[("doc", f"summary {k}", 0.5) for k in range(rated)], chosen=[])
        rs.keep(context(), tmp_path, model, judged, server_round=server_round, window=2)

    kept(0.1, 2, rated=1)
    kept(0.2, 3, rated=2)  # the killed attempt's round 3 (the checkpoint was after round 2)
    model, judged = rs.restore(context(), tmp_path, tiny_model, server_round=3)
    assert model.head.length.bias.item() == pytest.approx(0.1) and len(judged) == 1
    kept(0.3, 3, rated=2)  # the replay's round 3 replaces it
    assert sorted(rs.saved_rounds(tmp_path)) == [2, 3]
    model, _ = rs.restore(context(), tmp_path, tiny_model, server_round=4)
    assert model.head.length.bias.item() == pytest.approx(0.3)
    for server_round in (4, 5, 6):
        kept(0.4, server_round, rated=3)
    assert sorted(rs.saved_rounds(tmp_path)) == [4, 5, 6]  # what a checkpoint 2 rounds back needs
    # a damaged latest file: reported and started again, never an older version in its place
    (tmp_path / rs.STATE_FILE).write_bytes(b"damaged")
    model, judged = rs.restore(context(), tmp_path, tiny_model, server_round=7)
    assert len(judged) == 0 and model.head.length.bias.item() == 0.0


def test_a_shared_reward_model_never_carries_the_users_personal_parameters(tiny_model):
    """Under a LoRA personalization the summarizer's encoder holds the user's adapter; the
    reward model copies that encoder, and the adapter must not travel with it."""
    from flhf_core.learning.model import add_lora, personal_parameter_names

    summarizer = add_lora(tiny_model, rank=2, seed=0)
    personal = personal_parameter_names(summarizer, "lora")
    model = rm.RewardModel.from_summarizer(summarizer)
    copied = {n for n in rm.shared_names(model, personal_head=False) if "lora" in n}
    assert copied and copied <= personal  # the adapter is in the copy, under the same names
    shared = rm.shared_names(model, personal_head=False, personal=personal)
    assert not any("lora" in name for name in shared)
    assert {"head.content.weight", "head.length.weight", "head.length.bias"} <= shared and any(
        n.startswith("encoder.block") for n in shared
    )
    assert not any(
        n.startswith("head.") for n in rm.shared_names(model, personal_head=True, personal=personal)
    )


def test_ratings_of_one_document_also_give_the_pairs_they_order():
    judged = rm.Judgements(
        rated=[("a", "one", 0.9), ("a", "two", 0.2), ("a", "three", 0.2), ("b", "four", 0.5)],
        chosen=[("c", "five", "six")],
    )
    # the choice, then a's ordered pairs; the tie (two, three) and lone b give none
    assert judged.pairs() == [("c", "five", "six"), ("a", "one", "two"), ("a", "one", "three")]
    assert len(judged) == 5  # the budget counts what the user gave, not the pairs derived


def test_agreement_orders_the_users_pairs_as_the_model_scores_them(tiny_model, tokenizer, monkeypatch):
    def by_length(model, tokenizer, documents, summaries, max_tokens):
        return torch.tensor([float(len(s)) for s in summaries])

    monkeypatch.setattr(rm, "scores", by_length)
    model = rm.RewardModel.from_summarizer(tiny_model)
    pairs = [("d", "longer", "short"), ("d", "short", "longer"), ("d", "ab", "cd")]
    assert rm.agreement(model, tokenizer, pairs, 64) == [1.0, 0.0, 0.5]
    assert rm.agreement(model, tokenizer, [], 64) == []


def test_the_gates_record_and_its_cluster_survive_a_save():
    from flhf_core.client.reward_state import judgements_from_mapping, judgements_to_mapping

    for cluster in (None, 0, 3):
        judgements = rm.Judgements([("d", "s", 0.5)], [("d", "a", "b")], [1.0, 0.5], cluster)
        mapping = judgements_to_mapping(judgements)
        assert judgements_from_mapping(json.loads(json.dumps(mapping))) == judgements  # the file's metadata
        assert judgements_from_mapping(ConfigRecord(mapping)) == judgements  # Context.state
    before_clusters = judgements_to_mapping(rm.Judgements([], [], [1.0]))
    del before_clusters["checked-cluster"]  # state saved before the record knew its cluster
    assert judgements_from_mapping(before_clusters) == rm.Judgements([], [], [1.0], None)


def test_the_agreement_bound_is_wilsons_lower_bound():
    # By hand, 8 of 10 at z = 1.645: z^2 = 2.706; centre 0.8 + 2.706/20 = 0.9353; spread
    # 1.645 * sqrt(0.8 * 0.2/10 + 2.706/400) = 0.2482; (0.9353 - 0.2482) / (1 + 0.2706) = 0.5408.
    assert rm.agreement_lower_bound([1.0] * 8 + [0.0] * 2) == pytest.approx(0.5408, abs=1e-4)
    assert rm.agreement_lower_bound([]) == 0.0
    assert rm.agreement_lower_bound([0.5] * 10) == rm.agreement_lower_bound([1.0] * 5 + [0.0] * 5)
    # more of the same evidence: a tighter bound, always below the observed rate
    assert (
        rm.agreement_lower_bound([1.0] * 7 + [0.0] * 3)
        < rm.agreement_lower_bound([1.0] * 70 + [0.0] * 30)
        < 0.7
    )


def test_the_gate_trusts_a_model_only_on_enough_recent_agreement():
    assert rm.trusted([], 0.0)  # the gate off: always
    assert not rm.trusted([1.0] * (rm.TRUST_MINIMUM - 1), 0.55)  # too few checks: no evidence
    assert rm.trusted([1.0] * rm.TRUST_MINIMUM, 0.55)
    window = rm.TRUST_WINDOW
    assert not rm.trusted([1.0] * 23 + [0.0] * window, 0.55)  # old successes do not count
    assert rm.trusted([0.0] * 20 + [1.0] * 23 + [0.0] * (window - 23), 0.55)  # 23 of 32
    # 22 of 32 (0.69) is not enough: the first issue-13 run opened the gate on such windows
    # while the model's true accuracy was 0.55, and PPO lost its gain.
    assert not rm.trusted([1.0] * 22 + [0.0] * (window - 22), 0.55)
    assert not rm.trusted([0.5] * window, 0.4) and rm.trusted([0.5] * window, 0.35)  # ties: 0.5 each
