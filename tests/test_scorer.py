"""The feedback budget (issue 13): what the user is asked, and that it never exceeds the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flhf_core import data
from flhf_core.algorithms.rollout import Rollout
from flhf_core.algorithms.scorer import Scorer
from flhf_core.config import ConfigError, RunConfig
from flhf_core.feedback import UserProfile, judge, prefers_first, score

CAREFUL = UserProfile(0, "outcome", length_words=4, length_tolerance=2.0, rating_noise=0.0)


def rollout_of(documents: int, group: int) -> Rollout:
    """``group`` samples of each of ``documents`` documents, as ``sample`` lays them out."""
    examples = [
        data.Example(f"d{k}", "outcome", f"text {k}", "cats win big prizes") for k in range(documents)
    ]
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


def test_unlimited_rates_every_sample_as_the_user_always_did():
    """Budget 0 draws the same random numbers in the same order as the user rating every sample."""
    rollout = rollout_of(3, 4)
    feedback = Scorer(CAREFUL).rate(rollout, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    expected = [
        score(CAREFUL, judge(CAREFUL, t, e.summary).utility, rng)
        for t, e in zip(rollout.texts, rollout.examples, strict=True)
    ]
    assert feedback.scores.tolist() == pytest.approx(expected)
    assert feedback.rated.sum().item() == 12


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
    rollout = rollout_of(4, 4)
    unlimited = Scorer(CAREFUL).choose(rollout.texts, rollout.examples, np.random.default_rng(3))
    rng = np.random.default_rng(3)  # the same draws as a user answering every pair in order
    expected = []
    for a in range(0, 16, 2):
        rng.random()
        u_a, u_b = (judge(CAREFUL, rollout.texts[i], rollout.examples[i].summary).utility for i in (a, a + 1))
        expected.append((a, a + 1) if prefers_first(CAREFUL, u_a, u_b, rng) else (a + 1, a))
    assert unlimited == expected
    scorer = Scorer(CAREFUL, budget=3, steps=2)
    first = scorer.choose(rollout.texts, rollout.examples, np.random.default_rng(0))
    second = scorer.choose(rollout.texts, rollout.examples, np.random.default_rng(1))
    assert (len(first), len(second), scorer.used) == (2, 1, 3)


def test_a_budget_below_one_documents_samples_is_refused():
    with pytest.raises(ConfigError, match=r"ratings-per-round: 3 .* at least 4"):
        RunConfig.from_mapping({"feedback-algorithm": "ppo", "sft-rounds": 1, "ratings-per-round": 3})
    RunConfig.from_mapping({"feedback-algorithm": "dpo", "sft-rounds": 1, "ratings-per-round": 1})


def test_a_learned_scorer_keeps_the_users_ratings_and_scores_the_rest(tiny_model, tokenizer):
    from flhf_core import reward_model as rm
    from flhf_core.algorithms.scorer import LearnedScorer

    torch.manual_seed(0)
    judgements = rm.Judgements([], [])
    scorer = LearnedScorer(
        CAREFUL, 8, 2, 4, rm.RewardModel.from_summarizer(tiny_model), tokenizer, judgements, 3, 1e-2, 64
    )
    rollout = rollout_of(4, 4)
    rng = np.random.default_rng(0)
    first = scorer.rate(rollout, rng)  # step 1 of 2: one document's 4 samples
    assert scorer.used == len(judgements) == 4 and first.rated.sum().item() == 16  # all scored
    asked = [(d, t) for d, t, _ in judgements.rated]
    for i, (example, text) in enumerate(zip(rollout.examples, rollout.texts, strict=True)):
        if (example.document, text) in asked:  # the user's own rating, as given
            assert first.scores[i].item() == pytest.approx(judge(CAREFUL, text, example.summary).utility)
    second = scorer.rate(rollout, rng)
    assert scorer.used == len(judgements) == 8 and second.rated.sum().item() == 16
    found = scorer.diagnostics()
    assert set(found) <= {"reward-model-accuracy", "reward-model-correlation", "reward-model-gap"}
    assert "reward-model-gap" in found
    pairs = LearnedScorer(
        CAREFUL,
        2,
        1,
        1,
        rm.RewardModel.from_summarizer(tiny_model),
        tokenizer,
        rm.Judgements([], []),
        3,
        1e-2,
        64,
    )
    chosen = pairs.choose(rollout.texts, rollout.examples, np.random.default_rng(0))
    assert pairs.used == 2 and len(pairs.judgements.chosen) == 2 and len(chosen) >= 2


def test_a_reward_model_needs_a_budget_and_a_user_of_its_own():
    feedback = {"feedback-algorithm": "ppo", "sft-rounds": 1, "reward-model": "personal"}
    with pytest.raises(ConfigError, match=r"reward-model: 'personal' .* ratings-per-round > 0"):
        RunConfig.from_mapping(feedback)
    with pytest.raises(ConfigError, match="mode='centralized'"):
        RunConfig.from_mapping({**feedback, "ratings-per-round": 8, "mode": "centralized"})
    assert RunConfig.from_mapping({**feedback, "ratings-per-round": 8}).reward_model == "personal"
