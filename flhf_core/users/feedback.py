"""Simulated users: who they are, what they like, and how they say so.

A :class:`UserProfile` describes one user: the aspect of a paper they want summarized,
the length they like (and how strict they are about it), words they want to see or
avoid, how noisy their ratings are, and how often they bother to rate.

True utility of a summary ``s`` of document ``d`` for a user (every factor in [0, 1]):

    content(s)  = ROUGE-L F1(s, reference summary of d for the user's aspect)
    length(s)   = exp(-((words(s) - L) / tol)^2 / 2)
    keywords(s) = (1 + #include found) / (1 + #include)  *  (1 - #avoid found / (2 #avoid))
    utility(s)  = content(s) * length(s) * keywords(s)

(a factor whose keyword list is empty is 1). The user reports it two ways:

* a score (Likert-like): ``clip(utility + N(0, rating_noise^2), 0, 1)``, given only for a
  ``rating_rate`` share of the summaries (``None`` otherwise);
* a pairwise preference from the Bradley-Terry model (Bradley & Terry, 1952):
  ``P(a preferred to b) = sigmoid((utility(a) - utility(b)) / preference_temperature)``.

Each component is reported separately, so that a gain can be traced to content, length
or keywords. Randomness comes from a generator the caller seeds (user, round), so the
same seed gives the same feedback.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flhf_core.data.corpus import Example
from flhf_core.users.profiles import UserProfile, build_profile
from flhf_core.users.rouge import rouge_pair

__all__ = [
    "Judgement",
    "PooledExample",
    "UserProfile",
    "build_profile",
    "judge",
    "judging_profile",
    "preference_probability",
    "score",
]

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


# --------------------------------------------------------------------------
# Utility and feedback
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Judgement:
    """The true utility of one summary and its factors."""

    utility: float
    content: float
    length: float
    keywords: float
    words: int  # length of the summary
    repetition: float  # share of repeated word 3-grams (a reward-hacking diagnostic)


@dataclass(frozen=True)
class PooledExample(Example):
    """An example that remembers the user it came from: in ``mode = centralized`` one learner
    holds every user's feedback documents, and each sample is judged by its own user."""

    profile: UserProfile | None = None


def judging_profile(example: Example, default: UserProfile) -> UserProfile:
    """Who judges a summary of ``example``: the user it came from, else ``default`` (the client's user)."""
    return getattr(example, "profile", None) or default


def judge(profile: UserProfile, summary: str, reference: str) -> Judgement:
    """True utility of ``summary`` for ``profile``; ``reference`` is the preferred aspect's."""
    words = _WORD.findall(summary.lower())
    content = rouge_pair(summary, reference)["rougeL"] if words else 0.0
    length = math.exp(-0.5 * ((len(words) - profile.length_words) / profile.length_tolerance) ** 2)
    present = set(words)
    keywords = 1.0
    if profile.include_keywords:
        found = sum(k in present for k in profile.include_keywords)
        keywords *= (1 + found) / (1 + len(profile.include_keywords))
    if profile.avoid_keywords:
        found = sum(k in present for k in profile.avoid_keywords)
        keywords *= 1 - found / (2 * len(profile.avoid_keywords))
    return Judgement(
        content * length * keywords, content, length, keywords, len(words), repetition_rate(summary)
    )


def score(profile: UserProfile, utility: float, rng: np.random.Generator) -> float | None:
    """A noisy rating in [0, 1], or None when the user does not bother to rate."""
    if rng.random() >= profile.rating_rate:
        return None
    return float(np.clip(utility + rng.normal(0.0, profile.rating_noise), 0.0, 1.0))


def preference_probability(profile: UserProfile, utility_a: float, utility_b: float) -> float:
    """Bradley-Terry probability that the user prefers a over b."""
    z = (utility_a - utility_b) / profile.preference_temperature
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def paired_win_rate(utilities: Sequence[float], baseline: Sequence[float], profile: UserProfile) -> float:
    """The Bradley-Terry probability that the user prefers a model's summary of a document to a
    baseline model's summary of the same document, averaged over documents (paired by position)."""
    if len(utilities) != len(baseline) or not utilities:
        raise ValueError(f"{len(utilities)} utilities for {len(baseline)} baseline utilities")
    return float(
        np.mean([preference_probability(profile, a, b) for a, b in zip(utilities, baseline, strict=True)])
    )


def prefers_first(profile: UserProfile, utility_a: float, utility_b: float, rng: np.random.Generator) -> bool:
    """Draw the user's pairwise preference between a and b."""
    return bool(rng.random() < preference_probability(profile, utility_a, utility_b))


def repetition_rate(summary: str, n: int = 3) -> float:
    """Share of repeated word n-grams: a reward-hacking diagnostic (0 = none repeated)."""
    words = summary.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0
