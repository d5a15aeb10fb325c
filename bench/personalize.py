"""The personalize matrix: does feedback teach each user what it wants, beyond one shared model?

    nohup python bench/personalize.py > personalize.log 2>&1 &     # seeds 0-4, every row (resumable)
    python bench/personalize.py --seeds 0 --rows soft-prompt/reinforce code-bandit
    python bench/personalize.py --report                           # the figures of finished runs only

Per seed, on the ``personalize`` preset (24 users; ``configs/personalize.toml``):

1. the supervised phase, once (``sft-seed-<s>``: ``feedback-algorithm = sft``,
   ``personalization = none``), and its bounds (``flhf bounds``: ``fedavg-sft``,
   ``best-shared-code``, ``oracle``, ``first-L-words``, ``lead-1``, ``lead-2``);
2. each row's feedback phase, started from that model (``init-from``, ``sft-rounds = 0``,
   :data:`FEEDBACK_ROUNDS` rounds, every user in each), so every row of a seed starts alike;
3. ``local-only``: each user alone from scratch (supervised and feedback rounds), no init.

A user's reward in a row: the mean true utility of its final model (its personalized one,
where it has personal parameters) on its held-out documents (``judgements.json``); in a bound,
``bounds.json``'s. Figures per row (:func:`row_figures`): the mean and worst user (over seeds),
``gap-closed`` = (U - U_shared) / (U_oracle - U_shared) with U_shared the *shared baseline*,
the better of ``fedavg-sft`` and ``best-shared-code``; and paired differences per (seed, user)
against the shared baseline and ``local-only`` with their 95% intervals
(:mod:`flhf_core.results.statistics`). Which algorithm is best is decided on the users' reward
documents (the last feedback round's ``reward``), never on held-out ones.

Writes ``bench/results/quality.json`` (rows under ``methods``, each with ``per-seed`` users).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import PROJECT_DIR, run_flhf, write_result

from flhf_core.results.statistics import paired_interval
from flhf_core.results.tracking import read_metrics

PRESET = "personalize"
SEEDS = (0, 1, 2, 3, 4)
FEEDBACK_ROUNDS = 3
RESULTS = PROJECT_DIR / "results" / "personalize"
BOUNDS = ("fedavg-sft", "best-shared-code", "oracle", "first-L-words", "lead-1", "lead-2")
ALGORITHMS = ("reinforce", "best-of-n", "ppo", "dpo")
BEST = "{best}"  # the best soft-prompt algorithm, once the algorithm rows are in
SHARED_RATE = "feedback-learning-rate=0.0001"  # rows where the shared model learns from feedback too


def rows() -> dict[str, list[str]]:
    """Row name -> its feedback phase's overrides on the preset, in the order they run."""
    best = f"feedback-algorithm={BEST}"
    table = {f"soft-prompt/{a}": [f"feedback-algorithm={a}"] for a in ALGORITHMS}
    table["code-bandit"] = ["personalization=code-bandit"]
    table["lora"] = [
        best,
        "personalization=lora",
        "personal-feedback-learning-rate=0.0003",
    ]  # an adapter's rate
    for weighting in ("none", "linear", "history"):
        table[f"shared/{weighting}"] = [best, SHARED_RATE, f"reward-weighting={weighting}"]
    for budget in (8, 32):
        for reward_model in ("federated", "personal"):
            table[f"{reward_model}@{budget}"] = [
                best,
                f"ratings-per-round={budget}",
                f"reward-model={reward_model}",
            ]
    return table


def run_dir(name: str, seed: int) -> Path:
    return RESULTS / f"{name}-seed-{seed}"


def finished(folder: Path) -> bool:
    return (folder / "summary.json").is_file() and (folder / "judgements.json").is_file()


def user_rewards(folder: Path) -> dict[str, float]:
    """Each user's mean utility of its final model on its held-out documents."""
    users = json.loads((folder / "judgements.json").read_text())["users"]
    return {
        user: float(np.mean(values.get("judged-utility-personal") or values["judged-utility"]))
        for user, values in users.items()
    }


def reward_documents_score(folder: Path) -> float:
    """The users' reward on their fresh reward documents in the last round (what picks the best)."""
    rows = [r for r in read_metrics(folder / "metrics.jsonl") if r["scope"] == "server" and "reward" in r]
    return float(rows[-1]["reward"])


def ensure_sft(seed: int) -> Path:
    folder = run_dir("sft", seed)
    if not (folder / "model" / "config.json").is_file():
        items = [PRESET, "feedback-algorithm=sft", "personalization=none", f"seed={seed}"]
        run_flhf("run", items, RESULTS, folder.name)
    if not (folder / "bounds.json").is_file():
        command = [sys.executable, "-m", "flhf_core.runs.cli", "bounds", str(folder)]
        subprocess.run(command, check=True, cwd=PROJECT_DIR)
    return folder


def run_row(name: str, overrides: list[str], seed: int, best: str | None) -> None:
    folder = run_dir(name.replace("/", "-"), seed)
    if finished(folder):
        return
    if any(BEST in o for o in overrides) and best is None:
        print(f"{name} seed {seed}: waits for the algorithm rows", flush=True)
        return
    items = [PRESET, *(o.replace(BEST, best or "") for o in overrides), f"seed={seed}"]
    items += [f"init-from={ensure_sft(seed)}", "sft-rounds=0", f"num-server-rounds={FEEDBACK_ROUNDS}"]
    started = time.perf_counter()
    run_flhf("run", items, RESULTS, folder.name)
    print(f"{name} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)


def run_local_only(seed: int) -> None:
    folder = run_dir("local-only", seed)
    if not finished(folder):
        items = [
            PRESET,
            "mode=local-only",
            "personalization=none",
            "feedback-learning-rate=0.0003",
            f"seed={seed}",
        ]
        run_flhf("run", items, RESULTS, folder.name)


def best_algorithm(seeds: list[int]) -> str | None:
    """The soft-prompt algorithm with the highest mean reward on the users' reward documents."""
    scores = {}
    for algorithm in ALGORITHMS:
        folders = [run_dir(f"soft-prompt-{algorithm}", s) for s in seeds]
        if not all(finished(f) for f in folders):
            return None
        scores[algorithm] = np.mean([reward_documents_score(f) for f in folders])
    return max(scores, key=scores.get)


def collect(seeds: list[int]) -> dict[str, dict[int, dict[str, float]]]:
    """Method -> seed -> user -> reward, for every finished run and bound."""
    methods: dict[str, dict[int, dict[str, float]]] = {}
    for seed in seeds:
        bounds_file = run_dir("sft", seed) / "bounds.json"
        if bounds_file.is_file():
            bounds = json.loads(bounds_file.read_text())["methods"]
            for method in BOUNDS:
                methods.setdefault(method, {})[seed] = {u: v["reward"] for u, v in bounds[method].items()}
        for name in [*rows(), "local-only"]:
            folder = run_dir(name.replace("/", "-"), seed)
            if finished(folder):
                methods.setdefault(name, {})[seed] = user_rewards(folder)
    return methods


def matrix(per_seed: dict[int, dict[str, float]], seeds: list[int]) -> np.ndarray:
    """(seeds x users) rewards; users in a fixed order."""
    users = sorted(per_seed[seeds[0]], key=int)
    return np.array([[per_seed[s][u] for u in users] for s in seeds])


def row_figures(methods: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Every method's figures (see the module docstring); methods without every bound's seeds
    are compared on the seeds they share with the bounds."""
    figures: dict[str, dict[str, Any]] = {}
    for method, per_seed in methods.items():
        shared_seeds = sorted(
            set(per_seed) & set(methods.get("oracle", {})) & set(methods.get("fedavg-sft", {}))
        )
        entry: dict[str, Any] = {
            "seeds": sorted(per_seed),
            "per-seed": {str(s): per_seed[s] for s in sorted(per_seed)},
        }
        mine = matrix(per_seed, sorted(per_seed))
        entry["reward"] = float(mine.mean())
        entry["reward-worst"] = float(mine.mean(axis=0).min())  # the worst user, mean over seeds
        if shared_seeds:
            own = matrix(per_seed, shared_seeds)
            oracle = matrix(methods["oracle"], shared_seeds)
            candidates = {
                m: matrix(methods[m], shared_seeds)
                for m in ("fedavg-sft", "best-shared-code")
                if m in methods
            }
            baseline_name = max(candidates, key=lambda m: candidates[m].mean())
            baseline = candidates[baseline_name]
            entry["shared-baseline"] = baseline_name
            gap = oracle.mean() - baseline.mean()
            entry["gap-closed"] = float((own.mean() - baseline.mean()) / gap) if gap > 0 else None
            entry["ratio-to-shared"] = float(own.mean() / baseline.mean())
            entry["worst-ratio-to-shared"] = float(own.mean(axis=0).min() / baseline.mean(axis=0).min())
            entry["vs-shared"] = paired_interval(own - baseline).to_json()
            entry["users-at-least-shared"] = float(np.mean(own.mean(axis=0) >= baseline.mean(axis=0)))
        local = methods.get("local-only", {})
        common = sorted(set(per_seed) & set(local))
        if common and method != "local-only":
            entry["vs-local-only"] = paired_interval(
                matrix(per_seed, common) - matrix(local, common)
            ).to_json()
        figures[method] = entry
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--rows", nargs="+", default=[*rows(), "local-only"], choices=[*rows(), "local-only"])
    parser.add_argument("--report", action="store_true", help="only the figures of finished runs")
    args = parser.parse_args()
    if not args.report:
        for seed in args.seeds:
            ensure_sft(seed)
        for name in args.rows:
            for seed in args.seeds:
                if name == "local-only":
                    run_local_only(seed)
                else:
                    run_row(name, rows()[name], seed, best_algorithm(args.seeds))
    methods = collect(args.seeds)
    figures = row_figures(methods)
    for method, entry in sorted(figures.items(), key=lambda item: -item[1]["reward"]):
        gap = entry.get("gap-closed")
        print(
            f"{method:22s} reward {entry['reward']:.3f} worst {entry['reward-worst']:.3f} "
            f"gap-closed {'-' if gap is None else f'{gap:+.2f}'} seeds {entry['seeds']}"
        )
    write_result(
        "quality",
        {
            "preset": PRESET,
            "feedback-rounds": FEEDBACK_ROUNDS,
            "best-algorithm": best_algorithm(args.seeds),
            "methods": figures,
        },
    )


if __name__ == "__main__":
    main()
