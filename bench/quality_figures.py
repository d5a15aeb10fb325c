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
    config = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text()))
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


def targets(entries: Entries, best: str | None) -> list[dict[str, Any]]:
    """The issue's targets, each with the figures it compares (over the seeds all its methods
    have: :func:`on_common_seeds`), how many seeds that is, and whether it is met."""
    if best is None or BASELINE not in entries():
        return []
    found = []

    def check(name: str, value: float | None, threshold: float, met: bool | None, seeds: int) -> None:
        found.append({"target": name, "value": value, "threshold": threshold, "met": met, "seeds": seeds})

    table = entries(f"{best}/none/none")
    feedback, sft = table.get(f"{best}/none/none"), table[BASELINE]
    if feedback:
        seeds = feedback["seeds"]
        check("best algorithm reward / fedavg-sft", feedback["reward"] / sft["reward"], 1.25, None, seeds)
        check("best algorithm win rate vs fedavg-sft", feedback.get("win-rate"), 0.70, None, seeds)
        check(
            "best algorithm beats fedavg-sft on every seed",
            feedback["beats-fedavg-sft"],
            feedback["paired-seeds"],
            feedback["beats-fedavg-sft"] == feedback["paired-seeds"],
            seeds,
        )
        for other, name, threshold in (
            (f"centralized/{best}", "vs centralized with the same algorithm", 0.95),
            ("local-only", "vs local-only", 1.12),
        ):
            pair = entries(f"{best}/none/none", other)
            if other in pair:
                ratio = pair[f"{best}/none/none"]["reward"] / pair[other]["reward"]
                check(name, ratio, threshold, None, pair[other]["seeds"])
        for weighting in WEIGHTINGS:
            pair = entries(f"{best}/none/none", f"{best}/{weighting}/none")
            row, none = pair.get(f"{best}/{weighting}/none"), pair.get(f"{best}/none/none")
            if row and none:
                check(
                    f"{weighting}: worst-user reward above none's, mean within 2%",
                    row["reward-worst"] - none["reward-worst"],
                    0.0,
                    row["reward-worst"] > none["reward-worst"] and row["reward"] >= 0.98 * none["reward"],
                    row["seeds"],
                )
        lora = entries(f"{best}/none/lora").get(f"{best}/none/lora")
        if lora and "reward-global" in lora:
            check(
                "lora personalized / global",
                lora["reward"] / lora["reward-global"],
                1.15,
                None,
                lora["seeds"],
            )
    found += reward_model_targets(entries, best)
    for item in found:
        if item["met"] is None and item["value"] is not None:
            item["met"] = bool(item["value"] >= item["threshold"])
    return found


def reward_model_targets(entries: Entries, best: str) -> list[dict[str, Any]]:
    """Issue 13's targets: at 32 judgements, the best reward-model mode (``none`` included; the
    best learned model also on its own) keeps >= 80% of the unlimited budget's reward gain over
    fedavg-sft; at 8, federated or clustered beats personal on the mean and on the worst user.
    Each over the seeds all the rows it compares have."""
    modes_32 = ("none", "personal", "federated", "clustered")
    table = entries(f"{best}/none/none", *(f"{best}/none/none+{m}@32" for m in modes_32))
    sft, unlimited = table.get(BASELINE), table.get(f"{best}/none/none")
    if sft is None:  # the rows share no seed with fedavg-sft: nothing to compare at 32
        unlimited = None
    found = []
    at_32 = {m: table.get(f"{best}/none/none+{m}@32") for m in modes_32}
    at_32 = {m: row for m, row in at_32.items() if row}
    learned = {m: row for m, row in at_32.items() if m != "none"}
    gain = unlimited["reward"] - sft["reward"] if unlimited else None
    # a share of a gain is a figure only if there is a gain: one the unlimited budget has on
    # every seed compared, not a mean of a loss and a win (then any mode "keeps" 10-20x of it)
    paired = unlimited.get("paired-seeds") if unlimited else None
    beaten = unlimited.get("beats-fedavg-sft") if unlimited else None
    gain_on_every_seed = paired is None or beaten == paired
    # ``none`` is one of the modes (the budget alone, no model); the best learned
    # model is reported beside it, so a budget that needs no model cannot hide one that fails
    for label, candidates in (("the best mode", at_32), ("the best learned reward model", learned)):
        if gain is None or not candidates or (candidates is learned and "none" not in at_32):
            continue
        mode, row = max(candidates.items(), key=lambda item: item[1]["reward"])
        kept = (row["reward"] - sft["reward"]) / gain if gain > 0 else None
        target = {
            "target": f"at 32 judgements, {label} ({mode}) keeps of the unlimited budget's gain",
            "value": kept,
            "threshold": 0.8,
            "met": None if kept is not None and gain_on_every_seed else False,  # n/a: not met
            "seeds": row["seeds"],
            "unlimited-gain": gain,
        }
        if kept is not None and not gain_on_every_seed:
            target["note"] = (
                f"no gain to keep a share of: unlimited {best} beats fedavg-sft on {beaten} of "
                f"{paired} seeds (mean {gain:+.3f})"
            )
        found.append(target)
    comparisons = [(mode, "personal") for mode in ("federated", "clustered", "federated-head")]
    comparisons += [(f"{mode}-ungated", "personal-ungated") for mode in ("federated", "clustered")]
    for mode, against in comparisons:
        pair = entries(f"{best}/none/none+{mode}@8", f"{best}/none/none+{against}@8")
        row, reference = pair.get(f"{best}/none/none+{mode}@8"), pair.get(f"{best}/none/none+{against}@8")
        if reference and row:
            found.append(
                {
                    "target": f"at 8 judgements, {mode} beats {against} on the mean and the worst user",
                    "value": row["reward"] - reference["reward"],
                    "threshold": 0.0,
                    "met": row["reward"] > reference["reward"]
                    and row["reward-worst"] > reference["reward-worst"],
                    "seeds": row["seeds"],
                }
            )
    active_8, uniform_8, uniform_32 = (
        f"{best}/none/none+{m}" for m in ("personal-active@8", "personal@8", "personal@32")
    )
    accuracy = "reward-model-accuracy"  # paired over the runs that measured it, rows at 8 only
    pair = entries(active_8, uniform_8, having=accuracy)
    active, uniform = pair.get(active_8), pair.get(uniform_8)
    if active and uniform:
        found.append(  # what active queries buy at the same budget (reported, not an issue target)
            {
                "target": "active queries at 8 judgements: reward-model accuracy above uniform's",
                "value": active[accuracy] - uniform[accuracy],
                "threshold": 0.0,
                "met": None,
                "seeds": active["seeds"],
            }
        )
    triple = entries(active_8, uniform_8, uniform_32, having=accuracy)  # the saving: all three
    active, uniform, at_32 = (triple.get(row, {}).get(accuracy) for row in (active_8, uniform_8, uniform_32))
    if active is not None and uniform is not None and at_32 is not None:
        needed = equivalent_budget(active, uniform, at_32, 8, 32)
        found.append(  # how much active queries save: the budget uniform queries would need
            {
                "target": "uniform queries' budget for active@8's reward-model accuracy "
                "(log-linear between 8 and 32; > 8 saves judgements)",
                "value": needed,
                "threshold": 8.0,
                "met": None if needed is not None else False,
                "seeds": triple[active_8]["seeds"],
            }
        )
    return found


def equivalent_budget(
    accuracy: float, low_accuracy: float, high_accuracy: float, low: float, high: float
) -> float | None:
    """The budget at which uniform queries would reach ``accuracy``, interpolating their
    accuracy log-linearly in the budget between ``(low, low_accuracy)`` and ``(high,
    high_accuracy)`` (extrapolated beyond); None when uniform queries do not improve with the
    budget (then no budget can be read off)."""
    if high_accuracy <= low_accuracy:
        return None
    position = (accuracy - low_accuracy) / (high_accuracy - low_accuracy)
    return float(low * (high / low) ** position)
