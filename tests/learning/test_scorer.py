"""The feedback budget (issue 13): what the user is asked, and that it never exceeds the budget."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np
import pytest
import torch

from flhf_core.config import ConfigError, RunConfig
from flhf_core.data.corpus import Example
from flhf_core.learning.algorithms.rollout import Rollout
from flhf_core.learning.algorithms.scorer import Scorer
from flhf_core.users.feedback import PooledExample, UserProfile, judge, judging_profile, prefers_first, score

SEED = int(os.environ.get("FLHF_TEST_SEED", "0"))  # rerun with other seeds to check robustness
CAREFUL = UserProfile(0, "outcome", length_words=4, length_tolerance=2.0, rating_noise=0.0)


def rollout_of(documents: int, group: int) -> Rollout:
    """``group`` samples of each of ``documents`` documents, as ``sample`` lays them out."""
    examples = [Example(f"d{k}", "outcome", f"text {k}", "cats win big prizes") for k in range(documents)]
    texts = ["cats win", "cats win big prizes", "dogs", "cats win big prizes today"]
    size = documents * group
    zeros = torch.zeros(size, 3)
    return Rollout(
        [e for e in examples for _ in range(group)],
        zeros,
        zeros,
        zeros.long(),
        zeros,
        [texts[i % len(texts)] for i in range(size)],
        zeros,
    )


LAZY = UserProfile(1, "outcome", length_words=6, rating_noise=0.1, rating_rate=0.6)


def pooled_rollout() -> Rollout:
    """Three documents of 4 samples; the second one pooled from another user (centralized)."""
    rollout = rollout_of(3, 4)
    other = UserProfile(2, "outcome", length_words=2, rating_noise=0.05, rating_rate=0.8)
    pooled = [PooledExample(*dataclasses.astuple(e), profile=other) for e in rollout.examples[4:8]]
    return dataclasses.replace(rollout, examples=[*rollout.examples[:4], *pooled, *rollout.examples[8:]])


def test_unlimited_draws_exactly_what_the_user_rating_every_sample_drew():
    """Budget 0 reproduces the code before budgets (seeded runs stay bit for bit): the same
    ratings from the same random draws in the same order, the generator left in the same state."""
    rollout = pooled_rollout()
    ours = np.random.default_rng(5)
    feedback = Scorer(LAZY).rate(rollout, ours)
    theirs = np.random.default_rng(5)
    expected = []
    for example, text in zip(rollout.examples, rollout.texts, strict=True):  # the old rollout.rate
        user = judging_profile(example, LAZY)
        expected.append(score(user, judge(user, text, example.summary).utility, theirs))
    assert feedback.scores.tolist() == pytest.approx([0.0 if r is None else r for r in expected])
    assert feedback.rated.tolist() == [float(r is not None) for r in expected]
    assert ours.random() == theirs.random()


@pytest.mark.parametrize(("budget", "steps"), [(8, 10), (12, 3), (5, 2), (32, 10)])
def test_a_round_never_asks_more_than_the_budget_and_rates_whole_documents(budget, steps):
    scorer = Scorer(CAREFUL, budget=budget, steps=steps, group_size=4)
    rng = np.random.default_rng(0)
    per_step = []
    for _ in range(steps):
        feedback = scorer.rate(rollout_of(8, 4), rng)
        rated = feedback.rated.view(-1, 4).sum(dim=1)
        per_step.append(int(rated.sum()))
        # whole documents, except the remainder (budget mod 4) at the last step
        assert (rated[(rated > 0) & (rated < 4)]).numel() <= (1 if budget % 4 else 0)
    assert sum(per_step) == scorer.used == budget  # a careful user declines nothing: all is used
    assert feedback.utility.numel() == 32  # true utilities of every sample, for diagnostics


def test_a_declined_request_costs_nothing():
    lazy = UserProfile(0, "outcome", rating_rate=0.5, rating_noise=0.0)
    scorer = Scorer(lazy, budget=8, steps=1, group_size=4)
    feedback = scorer.rate(rollout_of(8, 4), np.random.default_rng(1))
    assert scorer.used == int(feedback.rated.sum()) == 8


def test_pairwise_choices_count_against_the_same_budget():
    rollout = pooled_rollout()
    ours = np.random.default_rng(3)
    unlimited = Scorer(LAZY).choose(rollout.texts, rollout.examples, ours)
    theirs = np.random.default_rng(3)
    expected = []
    for a in range(0, len(rollout.texts) - 1, 2):  # the old dpo.preference_pairs
        user = judging_profile(rollout.examples[a], LAZY)
        if theirs.random() >= user.rating_rate:
            continue
        u_a, u_b = (judge(user, rollout.texts[i], rollout.examples[i].summary).utility for i in (a, a + 1))
        expected.append((a, a + 1) if prefers_first(user, u_a, u_b, theirs) else (a + 1, a))
    assert unlimited == expected and ours.random() == theirs.random()
    scorer = Scorer(CAREFUL, budget=3, steps=2)
    first = scorer.choose(rollout.texts, rollout.examples, np.random.default_rng(0))
    second = scorer.choose(rollout.texts, rollout.examples, np.random.default_rng(1))
    assert (len(first), len(second), scorer.used) == (2, 1, 3)


def test_a_budget_below_one_documents_samples_is_refused():
    with pytest.raises(ConfigError, match=r"ratings-per-round: 3 .* at least 4"):
        RunConfig.from_mapping({"feedback-algorithm": "ppo", "sft-rounds": 1, "ratings-per-round": 3})
    RunConfig.from_mapping({"feedback-algorithm": "dpo", "sft-rounds": 1, "ratings-per-round": 1})


def test_a_learned_scorer_scores_only_the_documents_the_user_did_not_judge(tiny_model, tokenizer):
    from flhf_core.learning import reward_model as rm
    from flhf_core.learning.algorithms.scorer import LearnedScorer

    def learned(budget, steps, group, judgements=None):
        model = rm.RewardModel.from_summarizer(tiny_model)
        return LearnedScorer(
            CAREFUL,
            budget,
            steps,
            group,
            model,
            tokenizer,
            judgements or rm.Judgements([], []),
            3,
            1e-2,
            1e-2,
            64,
            trust=0.0,
        )

    torch.manual_seed(SEED)
    rollout = rollout_of(4, 4)
    nothing_yet = learned(8, 4, 4).rate(rollout, np.random.default_rng(0))  # step 1 of 4: no budget
    assert nothing_yet.rated.sum().item() == 0  # a model that learned nothing scores nothing
    scorer = learned(6, 1, 4)
    feedback = scorer.rate(rollout, np.random.default_rng(0))  # one whole document and 2 of another
    by_document = feedback.rated.view(4, 4).sum(dim=1).tolist()
    user = [len([1 for d, _, _ in scorer.judgements.rated if d == f"text {k}"]) for k in range(4)]
    assert sorted(user) == [0, 0, 2, 4] and scorer.used == 6
    for k in range(4):  # the user's documents keep its ratings alone; the model fills the others
        assert by_document[k] == (user[k] if user[k] else 4)
        for i in range(4 * k, 4 * k + 4):
            if user[k] and feedback.rated[i]:
                text = rollout.texts[i]
                assert feedback.scores[i].item() == pytest.approx(
                    judge(CAREFUL, text, "cats win big prizes").utility
                )
    assert len(scorer.judgements.checks) == len(rm.Judgements(scorer.judgements.rated, []).pairs())
    assert set(scorer.diagnostics()) == {
        "reward-model-trusted",
        "reward-model-heldout-accuracy",
        "reward-model-checks",
        "reward-model-accuracy",
        "reward-model-correlation",
        "reward-model-gap",
        "reward-model-score",
        "reward-model-utility",
    }
    pairs = learned(2, 1, 1)
    chosen = pairs.choose(rollout.texts, rollout.examples, np.random.default_rng(0))
    assert pairs.used == 2 and len(pairs.judgements.chosen) == 2 and len(chosen) == 8
    assert {"reward-model-gap", "reward-model-score"}.isdisjoint(pairs.diagnostics())  # pairs alone: no scale


def test_a_learned_scorer_lets_a_user_who_answers_every_pair_through(tiny_model, tokenizer):
    """DPO with a budget that covers every pair and a user who declines none leaves no pair for
    the reward model to score: the step goes on with the user's answers alone (it used to ask
    the model to score an empty batch, and the tokenizer raised)."""
    from flhf_core.learning import reward_model as rm
    from flhf_core.learning.algorithms.scorer import LearnedScorer

    model = rm.RewardModel.from_summarizer(tiny_model)
    scorer = LearnedScorer(
        CAREFUL, 4, 1, 2, model, tokenizer, rm.Judgements([], []), 1, 1e-3, 1e-2, 64, trust=0.0
    )
    rollout = rollout_of(4, 2)
    answered = scorer.choose(rollout.texts, rollout.examples, np.random.default_rng(SEED))
    assert len(answered) == 4 and scorer.used == 4 and len(scorer.judgements.chosen) == 4
    assert scorer.diagnostics()["reward-model-trusted"] == 1.0


def test_a_reward_model_needs_a_budget_and_a_user_of_its_own():
    feedback = {"feedback-algorithm": "ppo", "sft-rounds": 1, "reward-model": "personal"}
    with pytest.raises(ConfigError, match=r"reward-model: 'personal' .* ratings-per-round > 0"):
        RunConfig.from_mapping(feedback)
    with pytest.raises(ConfigError, match="mode='centralized'"):
        RunConfig.from_mapping({**feedback, "ratings-per-round": 8, "mode": "centralized"})
    assert RunConfig.from_mapping({**feedback, "ratings-per-round": 8}).reward_model == "personal"
    shared = {**feedback, "ratings-per-round": 8, "reward-model": "clustered", "mode": "local-only"}
    with pytest.raises(ConfigError, match=r"reward-model: 'clustered' shares .* mode='local-only'"):
        RunConfig.from_mapping(shared)
    with pytest.raises(ConfigError, match="reward-model-clusters"):
        RunConfig.from_mapping({**shared, "mode": "federated", "reward-model-clusters": 1})


def test_active_queries_ask_first_about_the_documents_the_model_can_least_tell_apart(
    tiny_model, tokenizer, monkeypatch
):
    """``reward-queries = active``: a model that scores a summary by its length spreads the
    samples of document 1 least (lengths 2, 2, 3, 2), so with a budget of one document the
    user is asked about document 1, and the figures say so (spreads 1 against 7 and 3)."""
    from flhf_core.learning import reward_model as rm
    from flhf_core.learning.algorithms.scorer import LearnedScorer

    def by_length(model, tokenizer, documents, summaries, max_tokens):
        return model.head.length.bias * 0 + torch.tensor([float(len(s)) for s in summaries])

    monkeypatch.setattr(rm, "scores", by_length)
    texts = ["a", "aaaaaaaa", "aa", "aaa", "bb", "bb", "bbb", "bb", "c", "cccc", "cc", "c"]
    rollout = dataclasses.replace(rollout_of(3, 4), texts=texts)

    def asked(active: bool, seed: int) -> set[str]:
        model = rm.RewardModel.from_summarizer(tiny_model)
        known = rm.Judgements([("text 9", "earlier", 0.5)], [])  # it has learned something
        scorer = LearnedScorer(
            CAREFUL, 4, 1, 4, model, tokenizer, known, 1, 1e-3, 1e-2, 64, trust=0.0, active=active
        )
        scorer.rate(rollout, np.random.default_rng(seed))
        if active:
            found = scorer.diagnostics()
            assert found["reward-model-queried-spread"] == 1.0
            assert found["reward-model-unqueried-spread"] == 5.0
        return {document for document, _, _ in scorer.judgements.rated[1:]}

    assert all(asked(True, seed) == {"text 1"} for seed in range(4))
    # a step with nothing to ask (budget 4 over 2 steps: all of it in the second) asks the model
    # nothing and counts no spread: "unqueried" means passed over, not out of budget
    model = rm.RewardModel.from_summarizer(tiny_model)
    known = rm.Judgements([("text 9", "earlier", 0.5)], [])
    scorer = LearnedScorer(
        CAREFUL, 4, 2, 4, model, tokenizer, known, 1, 1e-3, 1e-2, 64, trust=0.0, active=True
    )
    scorer.rate(rollout, np.random.default_rng(0))
    assert scorer.spreads == {"queried": [], "unqueried": []}
    scorer.rate(rollout, np.random.default_rng(1))
    assert scorer.spreads["queried"] == [1.0] and sorted(scorer.spreads["unqueried"]) == [3.0, 7.0]
    assert len({frozenset(asked(False, seed)) for seed in range(8)}) > 1  # uniform: by chance


def test_the_gate_keeps_an_untrusted_model_from_scoring(tiny_model, tokenizer):
    """``reward-model-trust``: the model is checked against the user's new judgements before
    it learns them; with too little agreement among the latest checks it scores nothing (the
    unjudged documents stay unjudged, as without a reward model; DPO's unanswered pairs stay
    open), with enough it scores them. The gate draws no random number: trust 0 (the code
    before the gate) and an untrusted model leave the generator in the same state."""
    from flhf_core.learning import reward_model as rm
    from flhf_core.learning.algorithms.scorer import LearnedScorer

    def scorer_with(history: list[float], trust: float = 0.55) -> LearnedScorer:
        torch.manual_seed(SEED)
        known = rm.Judgements([("text 9", "earlier", 0.5)], [], checks=list(history))
        model = rm.RewardModel.from_summarizer(tiny_model)
        return LearnedScorer(CAREFUL, 4, 1, 4, model, tokenizer, known, 1, 1e-3, 1e-2, 64, trust=trust)

    def rated_documents(scorer: LearnedScorer, rng: np.random.Generator) -> list[float]:
        return scorer.rate(rollout_of(3, 4), rng).rated.view(3, 4).sum(dim=1).tolist()

    distrusted = scorer_with([0.0] * rm.TRUST_WINDOW)
    gated_rng = np.random.default_rng(SEED)
    assert sorted(rated_documents(distrusted, gated_rng)) == [0, 0, 4]  # the user's document alone
    found = distrusted.diagnostics()
    assert found["reward-model-trusted"] == 0.0
    new_pairs = len(rm.Judgements(distrusted.judgements.rated[1:], []).pairs())
    assert new_pairs > 0 and distrusted.judgements.checks[-new_pairs:] == [0.5] * new_pairs  # ties
    assert len(distrusted.judgements.checks) == rm.TRUST_WINDOW  # only what the gate reads is kept
    assert "reward-model-accuracy" in found  # still measured while not trusted: the curve stays visible
    always_rng = np.random.default_rng(SEED)
    assert rated_documents(scorer_with([], trust=0.0), always_rng) == [4, 4, 4]
    assert gated_rng.random() == always_rng.random()
    trusted = scorer_with([1.0] * rm.TRUST_WINDOW)
    assert rated_documents(trusted, np.random.default_rng(SEED)) == [4, 4, 4]
    assert trusted.diagnostics()["reward-model-trusted"] == 1.0

    rollout = rollout_of(4, 2)  # DPO: 4 pairs, the user answers 2
    pairs = scorer_with([0.0] * rm.TRUST_WINDOW)
    pairs.budget = 2
    answered = pairs.choose(rollout.texts, rollout.examples, np.random.default_rng(SEED))
    assert len(answered) == 2 and pairs.diagnostics()["reward-model-trusted"] == 0.0
    assert len(pairs._predicted) == 4  # the open pairs were scored for the diagnostics, not used


def test_a_reward_model_that_never_scores_leaves_the_runs_random_streams_alone(tiny_model, tokenizer):
    """Building the reward model draws no random number, and fitting it draws from its own
    generator and gives torch's back, so a user whose model the gate keeps shut samples what a
    user without one samples: the rows of a matrix then differ by what the model does, not by
    shifted random streams (paired runs)."""
    from flhf_core.learning import reward_model as rm
    from flhf_core.learning.algorithms.scorer import LearnedScorer, Scorer

    def after_a_step(make: Callable[[], Scorer]) -> tuple[list[float], float, torch.Tensor, Scorer]:
        torch.manual_seed(SEED)
        scorer = make()  # as a round does: the reward model is built after the seed is set
        rng = np.random.default_rng(SEED)
        feedback = scorer.rate(rollout_of(3, 4), rng)
        return feedback.rated.tolist(), rng.random(), torch.rand(3), scorer

    def shut() -> LearnedScorer:
        model = rm.RewardModel.from_summarizer(tiny_model).train()  # dropout would draw
        judgements = rm.Judgements([], [])
        return LearnedScorer(
            CAREFUL, 4, 1, 4, model, tokenizer, judgements, 2, 1e-3, 1e-2, 64, trust=0.9, seed=7
        )

    *plain, _ = after_a_step(lambda: Scorer(CAREFUL, 4, 1, 4))
    *learned, scorer = after_a_step(shut)
    assert len(scorer.judgements) > 0 and scorer.losses  # it did learn this step
    assert learned[0] == plain[0] and learned[1] == plain[1] and torch.equal(learned[2], plain[2])
