"""The paired-difference rule: intervals that tell, half-widths, ratio targets."""

from __future__ import annotations

import numpy as np
import pytest

from flhf_core.results.statistics import paired_interval, ratio_met


def test_a_steady_lead_excludes_zero_and_noise_does_not():
    rng = np.random.default_rng(0)
    steady = 0.05 + rng.normal(0, 0.01, (5, 24))
    noise = rng.normal(0, 0.05, (5, 24))
    assert paired_interval(steady).excludes_zero
    assert paired_interval(steady).low > 0.04
    assert not paired_interval(noise).excludes_zero


def test_more_seeds_and_units_detect_smaller_differences():
    rng = np.random.default_rng(1)
    few = paired_interval(rng.normal(0, 0.05, (3, 6)))
    many = paired_interval(rng.normal(0, 0.05, (10, 48)))
    assert many.half_width < few.half_width / 2


def test_grouped_units_are_resampled_whole():
    """Three aspects of one paper move together: grouping them widens the interval."""
    rng = np.random.default_rng(2)
    papers = rng.normal(0, 0.1, (4, 20))
    differences = np.repeat(papers, 3, axis=1) + rng.normal(0, 0.01, (4, 60))
    grouped = paired_interval(differences, groups=[i // 3 for i in range(60)])
    ungrouped = paired_interval(differences)
    assert grouped.half_width > 1.3 * ungrouped.half_width


def test_a_ratio_target_needs_the_ratio_and_an_interval_that_excludes_zero():
    reference = np.full((5, 24), 0.10) + np.random.default_rng(3).normal(0, 0.01, (5, 24))
    assert ratio_met(reference * 1.6, reference, 1.5)
    assert not ratio_met(reference * 1.4, reference, 1.5)
    noisy = reference + np.random.default_rng(4).normal(0, 0.5, (5, 24))
    assert not ratio_met(noisy, reference, 0.5)  # the ratio holds, the interval does not
    assert not ratio_met(reference * 0.5, reference, 0.4)  # significantly worse is no win


def test_an_empty_matrix_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        paired_interval(np.zeros((0, 3)))
