"""bench/quality.py's figures: of one run (from its kept evidence), and the table and targets
over methods and seeds. Pure functions of the evidence files, so tests need no run.

Row figures: see bench/quality.py's docstring. Rows of a learned reward model
(``<algorithm>/none/none+<reward-model>@<budget>``, issue 13) also carry the reward model's
diagnostics from the last feedback round (``reward-model-accuracy``, ``-correlation``,
``-gap``, on the samples it scored; ``-heldout-accuracy``, its agreement with the users' own
latest judgements), the share of feedback steps it scored for the users over the run
(``reward-model-trusted``: the gate) and the judgements the users gave per round. Every
row with a kept metrics.jsonl also carries its reward averaged over the feedback rounds'
models (``reward-feedback-rounds``, ``reward-worst-feedback-rounds``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flhf_core.config import RunConfig
from flhf_core.results.tracking import read_metrics
from flhf_core.users.feedback import paired_win_rate
from flhf_core.users.profiles import build_profile

BASELINE = "fedavg-sft"
WEIGHTINGS = ("linear", "softmax", "gain", "history", "qfedavg")
REWARD_MODEL_FIGURES = (
    "reward-model-accuracy",
    "reward-model-correlation",
    "reward-model-gap",
    "reward-model-heldout-accuracy",  # on the user's own judgements, before it learned them
    "reward-model-queried-spread",  # active queries: what the user was asked about ...
    "reward-model-unqueried-spread",  # ... against what it was not
)
GATE = "reward-model-trusted"  # share of feedback steps it scored for the users, over the whole run
# the users' held-out reward averaged over every feedback round's model, not the last one alone
# (a run's reward moves ~0.02 from one round to the next): mean and worst user
OVER_FEEDBACK_ROUNDS = ("reward-feedback-rounds", "reward-worst-feedback-rounds")
FEEDBACK_ROUNDS_OF = "feedback-rounds"  # which rounds those are


# --------------------------------------------------------------------------
# Figures of one run (pure functions over judgements.json)
# --------------------------------------------------------------------------
def user_lists(judgements: dict, key: str) -> dict[str, list[float]]:
    """Each user's per-document ``key`` of the model the user uses (its personalized one if any)."""
    return {
        user: figures[f"{key}-personal"] if f"{key}-personal" in figures else figures[key]
        for user, figures in judgements["users"].items()
    }


def win_rate(method: dict[str, list[float]], baseline: dict[str, list[float]], config: RunConfig) -> float:
    """Mean over users of each user's :func:`~flhf_core.users.feedback.paired_win_rate` against the baseline."""
    return float(
        np.mean(
            [
                paired_win_rate(
                    utilities,
                    baseline[user],
                    build_profile(int(user), config.user_profiles, config.aspects, config.seed),
                )
                for user, utilities in method.items()
            ]
        )
    )


def checked_judgements(run_dir: Path) -> tuple[dict, dict, RunConfig]:
    """judgements.json, summary.json and the config of a finished run, checked: the judgements
    are the final model's, and every user's (a missing user would flatter the worst-user figure)."""
    judged = json.loads((run_dir / "judgements.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    config = RunConfig.from_saved(json.loads((run_dir / "config.json").read_text()))
    if judged["round"] != config.num_server_rounds:
        raise ValueError(f"{run_dir}: judgements of round {judged['round']}, not of the final model")
    if sorted(map(int, judged["users"])) != list(range(config.min_available_nodes)):
        raise ValueError(f"{run_dir}: judgements of users {sorted(judged['users'])}, not of every user")
    return judged, summary, config


def run_figures(run_dir: Path, baseline_dir: Path | None) -> dict[str, float]:
    """The row's figures (see the module docstring); win-rate needs the baseline's run."""
    judged, summary, config = checked_judgements(run_dir)
    utility = user_lists(judged, "judged-utility")
    means = [float(np.mean(u)) for u in utility.values()]
    figures = {
        "reward": float(np.mean(means)),
        "reward-worst": float(np.min(means)),
        "reward-std": float(np.std(means)),
        "rougeL": 100.0 * float(np.mean([np.mean(c) for c in user_lists(judged, "judged-content").values()])),
        "bytes": (summary["bytes-up"] + summary["bytes-down"]) / max(summary["rounds"], 1),
    }
    if all({"judged-utility", "judged-utility-personal"} <= set(f) for f in judged["users"].values()):
        shared = {user: f["judged-utility"] for user, f in judged["users"].items()}
        figures["reward-global"] = float(np.mean([np.mean(u) for u in shared.values()]))
        figures["personalized-vs-global-worst"] = float(
            min(np.mean(utility[u]) / max(np.mean(shared[u]), 1e-9) for u in utility)
        )
    if baseline_dir is not None:
        theirs, _, _ = checked_judgements(baseline_dir)
        if {u: f["doc-ids"] for u, f in theirs["users"].items()} != {
            u: f["doc-ids"] for u, f in judged["users"].items()
        }:
            raise ValueError(f"{run_dir} and {baseline_dir} judged different documents: no paired win rate")
        baseline = user_lists(theirs, "judged-utility")
        figures["win-rate"] = win_rate(utility, baseline, config)
    return figures


def reward_model_figures(run_dir: Path) -> dict[str, float]:
    """A learned reward model's diagnostics in the run's last feedback round (server row), the
    share of feedback steps it scored for the users over the run (the gate), and the
    judgements users gave per feedback round; {} without metrics.jsonl or a reward model."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    feedback = [r for r in read_metrics(path) if r["phase"] == "feedback"]
    rows = [r for r in feedback if r["scope"] == "server"]
    if not rows or "train-ratings-used" not in rows[-1]:
        return {}
    # per user and round: the users' own rows (the server's average weights users by examples)
    used = [r["train-ratings-used"] for r in feedback if r["scope"] == "client" and "train-ratings-used" in r]
    figures = {"ratings-used": float(np.mean(used or [r["train-ratings-used"] for r in rows]))}
    figures.update({key: float(rows[-1][key]) for key in REWARD_MODEL_FIGURES if key in rows[-1]})
    trusted = [r[GATE] for r in rows if GATE in r]
    if trusted:
        figures[GATE] = float(np.mean(trusted))
    return figures


def feedback_rounds_figures(run_dir: Path, final_reward: float) -> dict[str, Any]:
    """The users' held-out reward averaged over every feedback round's model
    (:data:`OVER_FEEDBACK_ROUNDS`: mean and worst user), of the model each user uses (its
    personalized one if any, as :func:`user_lists` takes it), and the rounds counted
    (:data:`FEEDBACK_ROUNDS_OF`: only runs that counted the same rounds are compared). {}
    without metrics.jsonl, or unless every feedback round's model was evaluated with no failed
    reply (a missing user would flatter the worst-user figure). ``final_reward`` (the table's,
    from judgements.json) must be the last round's: else the two files disagree."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [r for r in read_metrics(path) if r["scope"] == "server"]
    feedback = [r for r in rows if r["phase"] == "feedback"]
    personal = bool(feedback) and all("reward-personal" in r for r in feedback)
    columns = ("reward-personal", "reward-personal-worst") if personal else ("reward", "reward-worst")
    if not feedback or not all(
        all(c in r for c in columns) and r.get("eval-failures", 0) == 0 for r in feedback
    ):
        return {}
    if feedback[-1]["round"] == rows[-1]["round"] and not math.isclose(
        feedback[-1][columns[0]], final_reward, rel_tol=1e-9
    ):
        raise ValueError(
            f"{run_dir}: the last round's {columns[0]} in metrics.jsonl, {feedback[-1][columns[0]]}, "
            f"is not judgements.json's {final_reward}"
        )
    figures: dict[str, Any] = {
        key: float(np.mean([r[column] for r in feedback]))
        for key, column in zip(OVER_FEEDBACK_ROUNDS, columns, strict=True)
    }
    figures[FEEDBACK_ROUNDS_OF] = [r["round"] for r in feedback]
    return figures


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: mean and std over seeds of every figure, and on how many seeds it beats fedavg-sft."""
    baseline = {r["seed"]: r["reward"] for r in rows if r["method"] == BASELINE}
    table: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"seeds": len(mine)}
        for key in (
            "reward",
            "reward-worst",
            "reward-std",
            "win-rate",
            "rougeL",
            "bytes",
            "seconds",
            "reward-global",
            "ratings-used",
            *REWARD_MODEL_FIGURES,
            GATE,
            *OVER_FEEDBACK_ROUNDS,
        ):
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:  # "<key>-over-seeds": the spread over seeds ("reward-std" is across users)
                entry[key], entry[f"{key}-over-seeds"] = mean_std(values)
                entry[f"{key}-seeds"] = len(values)  # fewer than "seeds": some runs lack it
        paired = [r for r in mine if r["seed"] in baseline]
        entry["beats-fedavg-sft"] = sum(r["reward"] > baseline[r["seed"]] for r in paired)
        entry["paired-seeds"] = len(paired)
        table[method] = entry
    return table


# The entries of the methods a comparison names (and fedavg-sft's), as aggregate() gives them
Entries = Callable[..., dict[str, dict[str, Any]]]


def on_common_seeds(rows: list[dict[str, Any]]) -> Entries:
    """Entries of the named methods and fedavg-sft computed over the seeds all of those present
    have: rows of different seeds compared would compare seeds as much as methods (a method
    with one seed run against one with three). ``having``: only the named methods' runs that
    have that figure count (fedavg-sft is then left out: it has no reward model to compare)."""

    def entries(*methods: str, having: str | None = None) -> dict[str, dict[str, Any]]:
        kept = [r for r in rows if having is None or r.get(having) is not None]
        compared = methods if having else (BASELINE, *methods)
        present = [m for m in compared if any(r["method"] == m for r in kept)]
        if not present:
            return {}
        seeds = set.intersection(*({r["seed"] for r in kept if r["method"] == m} for m in present))
        return aggregate([r for r in kept if r["method"] in present and r["seed"] in seeds])

    return entries


def from_table(table: dict[str, dict[str, Any]]) -> Entries:
    """Entries read from a table as it is (the seeds are the table's business)."""
    return lambda *methods, having=None: table
