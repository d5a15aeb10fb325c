"""bench/personalize.py and its figures: from per-user figures and committed evidence (no run)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from flhf_core.config import PYPROJECT

sys.path.insert(0, str(PYPROJECT.parent / "bench"))
import personalize
import personalize_figures as pf

GROUPS = ("challenge short", "approach long")


def users(rewards, content=None, digests=None):
    """Users 0..n-1 in two groups (even, odd); every fourth user (3, 7, ...) has keywords."""
    found = {}
    for u, reward in enumerate(rewards):
        found[str(u)] = {
            "reward": float(reward),
            "content": float(content[u] if content is not None else 0.2),
            "length": 0.5,
            "group": GROUPS[u % 2],
            "has-keywords": u % 4 == 3,
            "digests": digests[u] if digests is not None else {},
        }
    return found


def methods_around(shared_level=0.10, gain=0.05, seeds=(0, 1, 2), n=8):
    rng = np.random.default_rng(0)
    base = {s: 0.10 + rng.normal(0, 0.005, n) + (shared_level - 0.10) for s in seeds}
    return {
        "fedavg-sft": {s: users(base[s] - 0.02) for s in seeds},
        "best-shared-code": {s: users(base[s]) for s in seeds},
        "oracle": {s: users(base[s] + 0.10) for s in seeds},
        "first-L-words": {s: users(np.full(n, 0.08)) for s in seeds},
        "soft-prompt/reinforce": {s: users(base[s] + gain, content=np.full(n, 0.3)) for s in seeds},
        "code-bandit": {s: users(base[s] + gain / 2) for s in seeds},
        "local-only": {s: users(np.full(n, 0.05)) for s in seeds},
    }


def test_gap_closed_ratios_and_intervals_against_the_shared_baseline():
    figures = pf.row_figures(methods_around())
    row = figures["soft-prompt/reinforce"]
    assert row["shared-baseline"] == "best-shared-code"
    assert row["gap-closed"] == pytest.approx(0.5)
    assert row["vs-shared"]["ratio"] == pytest.approx(0.15 / 0.10, rel=0.05)
    assert row["vs-shared"]["excludes-zero"] and row["vs-local-only"]["excludes-zero"]
    assert 0 < row["vs-shared"]["half-width"] < 0.01
    assert row["users-at-least-shared"] == 1.0
    assert row["reward-content"] == pytest.approx(0.3)
    assert figures["oracle"]["gap-closed"] == pytest.approx(1.0)
    assert figures["best-shared-code"]["gap-closed"] == pytest.approx(0.0)


def test_identical_summaries_count_only_pairs_of_users_in_different_groups():
    same = {"d1": 7, "d2": 8}
    # users 0 and 2 (one group) agree everywhere, user 1 (the other) agrees with them on d1 only
    found = users([0.1, 0.1, 0.1], digests=[same, {"d1": 7, "d2": 9}, same])
    assert pf.identical_share(found) == pytest.approx(2 / 4)  # (0,1) and (1,2) on d1 and d2
    assert pf.identical_share(users([0.1, 0.1])) is None  # no digests (a bound)


def test_targets_follow_the_ratio_rule_and_say_what_is_missed():
    methods = methods_around(gain=0.05)
    found = {t["target"]: t for t in pf.targets(methods, pf.row_figures(methods), "soft-prompt/reinforce")}
    ratio = found["mean reward / shared baseline"]
    assert ratio["met"] and ratio["value"] == pytest.approx(1.5, rel=0.05) and ratio["seeds"] == 3
    assert found["mean reward / local-only"]["met"]
    assert found["gap-closed (unlimited feedback)"]["met"] is False  # 0.5 < 0.7
    assert found["content factor rises over fedavg-sft"]["met"]
    assert found["learned conditioning >= code-bandit (mean)"]["met"]
    # a ratio reached on the means (1.5x) with an interval that holds zero is not met
    noisy = methods_around(gain=0.0)
    for s, seed_users in noisy["soft-prompt/reinforce"].items():
        for u, figures in seed_users.items():
            figures["reward"] += 0.55 if (int(u) + s) % 2 else -0.45
    found = {t["target"]: t for t in pf.targets(noisy, pf.row_figures(noisy), "soft-prompt/reinforce")}
    ratio = found["mean reward / shared baseline"]
    assert ratio["value"] >= 1.5 and ratio["interval"]["low"] < 0 and ratio["met"] is False


def test_a_user_missing_from_one_run_is_left_out_of_its_comparisons_not_misaligned():
    methods = methods_around()
    del methods["soft-prompt/reinforce"][1]["3"]  # user 3 missed the final evaluation of seed 1
    row = pf.row_figures(methods)["soft-prompt/reinforce"]
    assert row["gap-closed"] == pytest.approx(0.5)  # every other user still +0.05 of a 0.10 gap
    assert row["vs-shared"]["mean"] == pytest.approx(0.05)


def test_evidence_from_two_machines_pools_and_the_best_row_is_chosen_on_reward_documents(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(personalize, "EVIDENCE", tmp_path)
    methods = methods_around()
    for method, per_seed in methods.items():
        for seed, found in per_seed.items():
            path = personalize.evidence_path(method, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {"method": method, "seed": seed, "users": found}
            if method in ("soft-prompt/reinforce", "code-bandit"):
                # the bandit looks better on reward documents: it is a baseline, never "the best row"
                record["reward-documents"] = 0.2 if method == "code-bandit" else 0.1
            path.write_text(json.dumps(record))
    loaded, scores = personalize.load_evidence([0, 1, 2])
    assert {m: sorted(v) for m, v in loaded.items()} == {m: [0, 1, 2] for m in methods}
    assert loaded["oracle"][1] == methods["oracle"][1]
    assert personalize.best_row(scores, [0, 1, 2]) == "soft-prompt/reinforce"
    assert personalize.best_row(scores, [0, 1, 2, 3]) is None  # a seed no row has
    assert set(personalize.load_evidence([1])[0]["oracle"]) == {1}


def test_every_row_but_local_only_starts_from_the_seeds_supervised_model_and_names_the_best():
    table = personalize.rows()
    assert {"soft-prompt/reinforce", "code-bandit", "lora", "shared/history", "federated@8"} <= set(table)
    assert all(
        any("feedback-algorithm" in o or "personalization" in o for o in overrides)
        for overrides in table.values()
    )
    assert personalize.BEST in " ".join(table["lora"])


def fake_run(folder, status="completed", personal=True):
    """A finished feedback row as the ServerApp leaves it: summary, judgements, metrics."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"status": status}))
    suffix = "-personal" if personal else ""
    judged = {
        str(u): {
            "doc-ids": ["a", "b"],
            "judged-utility": [0.0, 0.0],  # the shared model's: never the personalized user's figure
            "judged-content": [0.0, 0.0],
            "judged-length": [0.0, 0.0],
            f"judged-utility{suffix}": [0.1 * u, 0.1 * u + 0.2],
            f"judged-content{suffix}": [0.3, 0.5],
            f"judged-length{suffix}": [1.0, 0.0],
            f"summary-digest{suffix}": [7, 2**52 - 1],
        }
        for u in (0, 1)
    }
    (folder / "judgements.json").write_text(json.dumps({"round": 3, "users": judged}))
    rows = [
        {"round": 1, "phase": "feedback", "scope": "server", "train-reward": 0.2, "reward": 0.9},
        {"round": 2, "phase": "feedback", "scope": "server", "train-reward": 0.4, "reward": 0.9},
        {"round": 2, "phase": "feedback", "scope": "client", "client": 0, "train-reward": 5.0},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


GROUPS_OF = {
    "0": {"group": "challenge short", "has-keywords": False},
    "1": {"group": "approach long", "has-keywords": True},
}


def test_a_row_s_evidence_is_its_personalized_users_and_its_reward_document_score(tmp_path, monkeypatch):
    monkeypatch.setattr(personalize, "EVIDENCE", tmp_path / "evidence")
    run = fake_run(tmp_path / "row")
    personalize.keep_evidence(
        "soft-prompt/reinforce", 0, run, GROUPS_OF, {"items": ["x=1"], "sft-model": "h"}
    )
    kept = json.loads(personalize.evidence_path("soft-prompt/reinforce", 0).read_text())
    user = kept["users"]["1"]
    assert user["reward"] == pytest.approx(0.2) and user["content"] == pytest.approx(0.4)
    assert user["length"] == pytest.approx(0.5) and user["digests"] == {"a": 7, "b": 2**52 - 1}
    assert user["group"] == "approach long" and user["has-keywords"]
    # chosen on the users' own reward documents over the feedback rounds, never held-out ones
    assert kept["reward-documents"] == pytest.approx(0.3)
    assert kept["items"] == ["x=1"] and kept["sft-model"] == "h"


def test_a_failed_run_never_becomes_evidence(tmp_path, monkeypatch):
    monkeypatch.setattr(personalize, "EVIDENCE", tmp_path / "evidence")
    run = fake_run(tmp_path / "row", status="failed")
    personalize.keep_evidence("soft-prompt/reinforce", 0, run, GROUPS_OF, {"items": []})
    assert not personalize.evidence_path("soft-prompt/reinforce", 0).exists()


def test_a_bound_keeps_its_keyword_factor_and_the_user_s_keyword_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(personalize, "EVIDENCE", tmp_path / "evidence")
    sft = tmp_path / "sft"
    (sft / "model").mkdir(parents=True)
    (sft / "model" / "model.safetensors").write_bytes(b"weights")
    figures = {"reward": 0.2, "content": 0.3, "length": 0.9, "keywords": 1.0}
    methods = {m: {"0": figures, "1": figures} for m in personalize.BOUNDS}
    (sft / "bounds.json").write_text(json.dumps({"best-shared-code": "outcome medium", "methods": methods}))
    personalize.keep_bounds_evidence(0, sft, GROUPS_OF)
    kept = json.loads(personalize.evidence_path("oracle", 0).read_text())
    assert kept["users"]["0"]["has-keywords"] is False and kept["users"]["0"]["keywords"] == 1.0
    assert kept["sft-model"] == personalize.sft_model(sft)


def test_evidence_that_is_not_one_method_or_not_one_start_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(personalize, "EVIDENCE", tmp_path)
    for seed, items, start in ((0, ["a=1"], "h0"), (1, ["a=2"], "h1")):
        path = personalize.evidence_path("lora", seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"method": "lora", "seed": seed, "items": items, "sft-model": start, "users": {}})
        )
    with pytest.raises(ValueError, match="not one method"):
        personalize.load_evidence([0, 1])
    path = personalize.evidence_path("oracle", 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"method": "oracle", "seed": 0, "sft-model": "other", "users": {}}))
    with pytest.raises(ValueError, match="different supervised models"):
        personalize.load_evidence([0])


def test_paired_judges_every_row_against_the_reference_by_its_interval():
    import paired

    found = {
        f["row"]: f
        for f in paired.comparisons(
            methods_around(), "best-shared-code", ["soft-prompt/reinforce", "local-only", "best-shared-code"]
        )
    }
    assert set(found) == {"soft-prompt/reinforce", "local-only"}  # never against itself
    assert found["soft-prompt/reinforce"]["verdict"] == "beats it"
    assert (
        found["soft-prompt/reinforce"]["mean"] == pytest.approx(0.05)
        and found["soft-prompt/reinforce"]["users"] == 8
    )
    assert found["local-only"]["verdict"] == "behind it"
    content = paired.comparisons(
        methods_around(), "best-shared-code", ["soft-prompt/reinforce"], key="content"
    )
    assert content[0]["mean"] == pytest.approx(0.1)  # 0.3 against 0.2
