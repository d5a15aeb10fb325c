"""The simulated users: deterministic, consistent, and Bradley-Terry in their choices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flhf_core.config import ConfigError, RunConfig
from flhf_core.data.corpus import Example, load_corpus
from flhf_core.users.feedback import (
    UserProfile,
    build_profile,
    judge,
    paired_win_rate,
    preference_probability,
    prefers_first,
    repetition_rate,
    score,
)

ASPECTS = ("challenge", "approach", "outcome")


def test_presets_are_deterministic_and_differ_as_documented():
    users = [build_profile(u, "aspects", ASPECTS, seed=1) for u in range(6)]
    assert users == [build_profile(u, "aspects", ASPECTS, seed=1) for u in range(6)]
    assert [u.aspect for u in users] == list(ASPECTS) * 2
    assert [u.length_words for u in users] == [15, 15, 15, 25, 25, 25]
    assert len({u.rating_noise for u in users}) == 6
    uniform = {build_profile(u, "uniform", ASPECTS, seed=1) for u in range(4)}
    assert {(p.aspect, p.length_words) for p in uniform} == {("challenge", 25)}


def test_custom_profiles_from_toml(tmp_path):
    path = tmp_path / "users.toml"
    path.write_text(
        '[[user]]\naspect = "outcome"\nlength_words = 12\ninclude_keywords = ["BLEU"]\n\n'
        '[[user]]\naspect = "approach"\nrating_rate = 0.5\n'
    )
    first, second, third = (build_profile(u, str(path), ASPECTS, seed=0) for u in range(3))
    assert (first.aspect, first.length_words, first.include_keywords) == ("outcome", 12, ("bleu",))
    assert (second.aspect, second.rating_rate) == ("approach", 0.5)
    assert third.aspect == "outcome"  # tables repeat


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[user]]\naspect = "outcome"\nlength = 3\n', "unknown fields \\['length'\\]"),
        ('[[user]]\naspect = "method"\n', "aspect 'method' is not one of"),
        ('[[user]]\naspect = "outcome"\nrating_rate = 0\n', "invalid rating_rate"),
        ("title = 1\n", "no \\[\\[user\\]\\] tables"),
    ],
)
def test_bad_profile_files_are_named(tmp_path, text, message):
    path = tmp_path / "users.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_profile(0, str(path), ASPECTS, seed=0)
    with pytest.raises(ConfigError, match="neither a preset"):
        build_profile(0, str(tmp_path / "absent.toml"), ASPECTS, seed=0)


def test_the_preferred_aspect_scores_higher():
    corpus = load_corpus(RunConfig())
    for aspect in ASPECTS:
        profile = UserProfile(0, aspect, length_words=25, length_tolerance=1000)
        wins = 0
        for doc in corpus.documents[:60]:
            own = judge(profile, doc.summary(aspect), doc.summary(aspect)).utility
            others = [
                judge(profile, doc.summary(a), doc.summary(aspect)).utility for a in ASPECTS if a != aspect
            ]
            wins += own > max(others)
        assert wins == 60


def test_length_and_keyword_factors():
    profile = UserProfile(
        0,
        "outcome",
        length_words=4,
        length_tolerance=2,
        include_keywords=("bleu",),
        avoid_keywords=("novel",),
    )
    reference = "results improve bleu scores"
    exact = judge(profile, "results improve bleu scores", reference)
    assert exact.length == 1.0 and exact.content == pytest.approx(1.0) and exact.keywords == 1.0
    longer = judge(profile, "results improve bleu scores on many many tasks", reference)
    assert longer.length == pytest.approx(np.exp(-2)) and longer.utility < exact.utility  # 2 tolerances off
    missing = judge(profile, "results improve rouge scores", reference)
    assert missing.keywords == 0.5
    avoided = judge(profile, "novel results improve bleu", reference)
    assert avoided.keywords == 0.5
    assert judge(profile, "", reference).utility == 0.0


def test_scores_are_noisy_seeded_and_sometimes_missing():
    profile = UserProfile(0, "outcome", rating_noise=0.05, rating_rate=0.7)
    draws = [score(profile, 0.3, np.random.default_rng(s)) for s in range(3000)]
    again = [score(profile, 0.3, np.random.default_rng(s)) for s in range(3000)]
    assert draws == again
    given = np.array([d for d in draws if d is not None])
    assert 0.67 < len(given) / len(draws) < 0.73
    assert given.mean() == pytest.approx(0.3, abs=0.005) and given.std() == pytest.approx(0.05, rel=0.1)
    assert ((given >= 0) & (given <= 1)).all()


@pytest.mark.parametrize("difference", [0.0, 0.01, 0.03, -0.02])
def test_preferences_follow_bradley_terry(difference):
    """The empirical choice frequency matches sigmoid(Δu / τ); a flipped simulator fails."""
    profile = UserProfile(0, "outcome", preference_temperature=0.02)
    rng = np.random.default_rng(5)
    trials = 4000
    chosen = sum(prefers_first(profile, 0.2 + difference, 0.2, rng) for _ in range(trials)) / trials
    expected = 1 / (1 + np.exp(-difference / 0.02))
    assert expected == pytest.approx(preference_probability(profile, 0.2 + difference, 0.2))
    tolerance = 4 * np.sqrt(expected * (1 - expected) / trials) + 1e-9
    assert abs(chosen - expected) < tolerance
    if difference:
        assert (chosen > 0.5) == (difference > 0)


def test_repetition_rate():
    assert repetition_rate("a b c d e") == 0.0
    assert repetition_rate("the model the model the model") > 0.4


def test_paired_win_rate_is_the_mean_bradley_terry_probability_by_document():
    profile = build_profile(0, "aspects", ("challenge", "approach", "outcome"), seed=0)
    t = profile.preference_temperature
    expected = (1 / (1 + math.exp(-0.1 / t)) + 0.5 + 1 / (1 + math.exp(0.2 / t))) / 3
    assert paired_win_rate([0.3, 0.2, 0.1], [0.2, 0.2, 0.3], profile) == pytest.approx(expected)
    assert paired_win_rate([0.4, 0.1], [0.4, 0.1], profile) == pytest.approx(0.5)  # a model against itself
    with pytest.raises(ValueError, match="baseline"):
        paired_win_rate([0.1], [0.1, 0.2], profile)


def test_a_pooled_example_is_judged_by_the_user_it_came_from():
    """Centralized mode: one learner's rollout mixes users; each sample is rated by its own user."""
    import torch

    from flhf_core.learning.algorithms.rollout import Rollout
    from flhf_core.learning.algorithms.scorer import Scorer
    from flhf_core.users.feedback import PooledExample

    likes_short = UserProfile(0, "outcome", length_words=3, length_tolerance=1.0, rating_noise=0.0)
    likes_long = UserProfile(1, "outcome", length_words=30, length_tolerance=1.0, rating_noise=0.0)
    plain = Example("d", "outcome", "text", "cats win big")
    pooled = PooledExample("d", "outcome", "text", "cats win big", profile=likes_long)
    zeros = torch.zeros(2, 3)
    rollout = Rollout([plain, pooled], zeros, zeros, zeros.long(), zeros, ["cats win big"] * 2, zeros)
    feedback = Scorer(likes_short).rate(rollout, np.random.default_rng(0))  # the client's user: likes_short
    assert feedback.utility[0].item() == pytest.approx(1.0)  # judged by likes_short: a perfect summary
    assert feedback.utility[1].item() < 1e-6  # judged by its own user, who wanted 30 words
