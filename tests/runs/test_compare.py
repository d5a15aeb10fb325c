"""``flhf compare``: runs side by side, and mean ± std over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flhf_core.config import RunConfig
from flhf_core.runs import cli
from flhf_core.runs.compare import load_run, markdown_table


def fake_run(
    root: Path, name: str, seed: int, reward: float, users: dict[int, float] | None = None, **config
) -> Path:
    """A run folder as the ServerApp writes it (config, summary, metrics; with ``users``, each
    user's held-out utilities in judgements.json)."""
    folder = root / name
    folder.mkdir()
    mapping = RunConfig(seed=seed, run_name=name, **config).to_mapping()
    (folder / "config.json").write_text(json.dumps(mapping))
    summary = {
        "status": "completed",
        "reward": reward,
        "reward-worst": reward / 2,
        "win-rate": 0.6,
        "rougeL": 18.0,
        "bytes-up": 100,
        "bytes-down": 200,
        "seconds": 30.0,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = [
        {"round": r, "phase": "sft", "scope": "server", "client": None, "reward": reward * r / 2}
        for r in (1, 2)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if users is not None:
        judged = {
            str(u): {"doc-ids": ["a", "b"], "judged-utility": [v - 0.01, v + 0.01]} for u, v in users.items()
        }
        (folder / "judgements.json").write_text(json.dumps({"round": 2, "users": judged}))
    return folder


def test_runs_that_differ_only_in_seed_are_one_row_of_mean_and_spread(tmp_path, capsys):
    runs = [
        fake_run(tmp_path, f"s{seed}", seed, reward) for seed, reward in ((1, 0.10), (2, 0.20), (3, 0.30))
    ]
    assert cli.main(["compare", *map(str, runs), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "s1: 3 seeds (1, 2, 3)" in table and "0.200 ± 0.100" in table  # mean ± sample std of the rewards
    assert "300 ± 0" in table  # bytes: up + down
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 0
    assert table in capsys.readouterr().out


def test_runs_of_different_experiments_get_a_row_each(tmp_path):
    a = load_run(fake_run(tmp_path, "none", 1, 0.1))
    b = load_run(fake_run(tmp_path, "softmax", 1, 0.2, reward_weighting="softmax"))
    table = markdown_table([a, b])
    assert "| none | 0.100 |" in table and "| softmax | 0.200 |" in table and "±" not in table


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    assert cli.main(["compare", str(tmp_path)]) == 2


def test_failed_and_unfinished_runs_are_listed_apart_and_never_averaged(tmp_path):
    done = [fake_run(tmp_path, f"s{seed}", seed, 0.1 * seed) for seed in (1, 2)]
    failed = fake_run(tmp_path, "s3", 3, 0.9)
    summary = json.loads((failed / "summary.json").read_text())
    (failed / "summary.json").write_text(
        json.dumps({**summary, "status": "failed", "error": "RoundFailed: x"})
    )
    running = fake_run(tmp_path, "s4", 4, 0.9)
    (running / "summary.json").unlink()
    table = markdown_table([load_run(d) for d in (*done, failed, running)])
    assert "s1: 2 seeds (1, 2)" in table and "0.150 ± 0.071" in table  # the failed 0.9s are not in it
    assert "- s3: failed: RoundFailed: x" in table and "- s4: incomplete" in table


def test_runs_differing_in_where_and_how_they_ran_group_into_one_method(tmp_path):
    a = fake_run(tmp_path, "a", 1, 0.1, tracking="none", checkpoint_every=2)
    b = fake_run(tmp_path, "b", 2, 0.3, tracking="tensorboard", resume=False)
    c = fake_run(tmp_path, "c", 3, 0.5, reward_weighting="linear")  # another method
    table = markdown_table([load_run(d) for d in (a, b, c)])
    assert "| a: 2 seeds (1, 2) | 0.200 ± 0.141 |" in table and "| c | 0.500 |" in table


def test_methods_are_judged_against_the_first_by_paired_intervals_over_seeds_and_users(tmp_path):
    rng = np.random.default_rng(0)
    base = {seed: {u: 0.2 + 0.1 * rng.random() for u in range(8)} for seed in (1, 2, 3)}
    noise = {seed: {u: rng.normal(0, 0.01) for u in range(8)} for seed in (1, 2, 3)}
    runs = []
    for seed in (1, 2, 3):
        runs.append(fake_run(tmp_path, f"sft{seed}", seed, 0.2, base[seed]))
        # better for every user of every seed by 0.05, give or take 0.01
        better = {u: v + 0.05 + noise[seed][u] for u, v in base[seed].items()}
        runs.append(fake_run(tmp_path, f"fb{seed}", seed, 0.25, better, feedback_algorithm="ppo"))
        # the same as the reference, give or take 0.01: no difference to see
        same = {u: v + noise[seed][u] for u, v in base[seed].items()}
        runs.append(fake_run(tmp_path, f"lin{seed}", seed, 0.2, same, reward_weighting="linear"))
        worse = {u: v - 0.05 + noise[seed][u] for u, v in base[seed].items()}
        runs.append(fake_run(tmp_path, f"none{seed}", seed, 0.15, worse, reward_weighting="gain"))
    runs.append(fake_run(tmp_path, "other", 9, 0.3, {0: 0.3}, reward_weighting="history"))
    table = markdown_table([load_run(d) for d in runs])
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.count("|") == 8}
    assert "Against `sft1: 3 seeds (1, 2, 3)`" in table
    ppo = lines["| fb1: 3 seeds (1, 2, 3)"].split(" | ")
    assert ppo[1] == "3 x 8" and ppo[-1] == "beats it |"
    assert abs(float(ppo[2]) - 0.05) < 0.01 and abs(float(ppo[5].rstrip("x")) - 1.2) < 0.1
    assert lines["| none1: 3 seeds (1, 2, 3)"].endswith("behind it |")
    assert "no difference" in lines["| lin1: 3 seeds (1, 2, 3)"]
    assert "no shared seed" in lines["| other"]


def test_users_judged_on_other_documents_are_not_paired(tmp_path):
    a = fake_run(tmp_path, "a", 1, 0.2, {0: 0.2, 1: 0.2})
    b = fake_run(tmp_path, "b", 1, 0.3, {0: 0.3, 1: 0.3}, reward_weighting="linear")
    judged = json.loads((b / "judgements.json").read_text())
    judged["users"]["1"]["doc-ids"] = ["c", "d"]  # another split: user 1 read other documents
    (b / "judgements.json").write_text(json.dumps(judged))
    table = markdown_table([load_run(a), load_run(b)])
    assert "| b | 1 x 1 |" in table


def test_a_user_s_reward_is_its_personalized_model_s_where_it_has_one(tmp_path):
    folder = fake_run(tmp_path, "p", 1, 0.2, {0: 0.2})
    judged = json.loads((folder / "judgements.json").read_text())
    judged["users"]["0"]["judged-utility-personal"] = [0.5, 0.7]
    (folder / "judgements.json").write_text(json.dumps(judged))
    assert load_run(folder).user_rewards == {0: (pytest.approx(0.6), ("a", "b"))}
