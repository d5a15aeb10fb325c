"""When one row beats another: paired differences and their bootstrap intervals.

Rows of one seed share everything up to where they differ (documents, users, the supervised
phase), so the figure to judge is the difference *on the same seed and unit* (a user, a test
paper): a (seeds x units) matrix. Its 95% interval is a bootstrap that resamples seeds and
units independently (Efron & Tibshirani, 1993), so both kinds of variation are in it; units
may come in groups that are resampled whole (a paper's three aspects are not independent).

The rule every table uses: a row *beats* another when the interval of its paired difference
lies above zero; a ratio target (e.g. 1.5x the shared baseline) is *met* when the ratio of the
means reaches it and the interval lies above zero. The interval's half-width is the smallest
difference these seeds and units can detect; tables print it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

DRAWS = 2000  # bootstrap resamples
LEVEL = 95.0  # percent


@dataclass(frozen=True)
class Interval:
    """The mean paired difference and its bootstrap interval."""

    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def half_width(self) -> float:
        """The smallest detectable difference: half the interval's width."""
        return (self.high - self.low) / 2

    def to_json(self) -> dict[str, float | bool]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "excludes-zero": self.excludes_zero}


def paired_interval(
    differences: np.ndarray,
    groups: Sequence[Hashable] | None = None,
    rng: np.random.Generator | None = None,
    draws: int = DRAWS,
) -> Interval:
    """The mean of a (seeds x units) matrix of paired differences and its 95% interval, seeds
    and units resampled independently; ``groups`` names each unit's group (resampled whole;
    default: every unit its own group)."""
    differences = np.asarray(differences, dtype=float)
    if differences.ndim != 2 or differences.size == 0:
        raise ValueError(
            f"paired differences must be a non-empty (seeds x units) matrix, got {differences.shape}"
        )
    rng = rng if rng is not None else np.random.default_rng(0)
    columns: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups if groups is not None else range(differences.shape[1])):
        columns.setdefault(group, []).append(index)
    members = list(columns.values())
    seeds = differences.shape[0]
    means = np.empty(draws)
    for i in range(draws):
        rows = rng.integers(0, seeds, seeds)
        units = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        means[i] = differences[np.ix_(rows, units)].mean()
    low, high = np.percentile(means, [(100 - LEVEL) / 2, 100 - (100 - LEVEL) / 2])
    return Interval(float(differences.mean()), float(low), float(high))


def ratio_met(
    mine: np.ndarray, reference: np.ndarray, target: float, interval: Interval | None = None
) -> bool:
    """Whether ``mine`` reaches ``target`` times ``reference`` (a ratio of means over seeds and
    units) with the paired difference's interval above zero (mine better: a target of at least 1)."""
    interval = interval or paired_interval(np.asarray(mine) - np.asarray(reference))
    return float(np.mean(mine)) >= target * float(np.mean(reference)) and interval.low > 0
