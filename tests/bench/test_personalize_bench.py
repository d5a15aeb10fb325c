"""bench/personalize.py: a row's figures from per-user rewards (no run needed)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from flhf_core.config import PYPROJECT

sys.path.insert(0, str(PYPROJECT.parent / "bench"))
import personalize


def users(values):
    return {str(u): float(v) for u, v in enumerate(values)}


def test_gap_closed_ratios_and_intervals_against_the_shared_baseline():
    rng = np.random.default_rng(0)
    seeds = (0, 1, 2)
    shared = {s: users(0.10 + rng.normal(0, 0.005, 8)) for s in seeds}
    methods = {
        "fedavg-sft": {s: users(np.array(list(shared[s].values())) - 0.02) for s in seeds},
        "best-shared-code": shared,
        "oracle": {s: users(np.array(list(shared[s].values())) + 0.10) for s in seeds},
        "soft-prompt/reinforce": {s: users(np.array(list(shared[s].values())) + 0.05) for s in seeds},
        "local-only": {s: users(np.full(8, 0.05)) for s in seeds},
    }
    figures = personalize.row_figures(methods)
    row = figures["soft-prompt/reinforce"]
    assert row["shared-baseline"] == "best-shared-code"
    assert row["gap-closed"] == pytest.approx(0.5)
    assert row["ratio-to-shared"] == pytest.approx(0.15 / 0.10, rel=0.05)
    assert row["vs-shared"]["excludes-zero"] and row["vs-local-only"]["excludes-zero"]
    assert row["users-at-least-shared"] == 1.0
    assert figures["oracle"]["gap-closed"] == pytest.approx(1.0)
    assert figures["best-shared-code"]["gap-closed"] == pytest.approx(0.0)


def test_every_row_but_local_only_starts_from_the_seeds_supervised_model_and_names_the_best():
    table = personalize.rows()
    assert {"soft-prompt/reinforce", "code-bandit", "lora", "shared/history", "federated@8"} <= set(table)
    assert all(
        any("feedback-algorithm" in o or "personalization" in o for o in overrides)
        for overrides in table.values()
    )
    assert personalize.BEST in " ".join(table["lora"])
