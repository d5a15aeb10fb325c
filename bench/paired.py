"""Paired differences between rows of bench/quality.py's matrix, seed by seed.

A method's mean over three seeds against another's says little when the seeds differ more
than the methods do (on the default preset one seed's reward runs 0.02 above another's). The
rows of one seed share everything up to the first step where they differ (the supervised
rounds, the documents, the users), so the difference *on the same seed* is the figure: for
each pair, the per-seed differences of the users' mean and worst reward, their mean, their
standard error (sd / sqrt(n)), and on how many seeds the row is ahead. Pure functions of
``quality.json``'s rows, so tests need no run.

Pairs (issue 13): every reward-model row against ``none`` at its budget (what the learned
model adds to the budget alone), against ``fedavg-sft`` and against the unlimited budget of
its algorithm (``<algorithm>/none/none``).

Beside the final model's reward, where both rows kept their metrics.jsonl, the same
differences of the reward averaged over every feedback round's model
(``reward-feedback-rounds``): one round's reward moves by ~0.02 from the next on this preset,
so a lead that holds over the rounds is firmer than one in the last round alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from quality_figures import BASELINE, FEEDBACK_ROUNDS_OF, OVER_FEEDBACK_ROUNDS


def paired_difference(rows: list[dict[str, Any]], method: str, reference: str) -> dict[str, Any] | None:
    """``method`` minus ``reference`` on the seeds both have: per seed, mean and standard error
    of the users' reward and of the worst user's (and of their means over the feedback rounds,
    where every row compared has them, over the same rounds); None when they share no seed.
    ``ahead``: on how many seeds the final reward is ahead."""
    mine = {r["seed"]: r for r in rows if r["method"] == method}
    theirs = {r["seed"]: r for r in rows if r["method"] == reference}
    seeds = sorted(mine.keys() & theirs.keys())
    if not seeds:
        return None
    result: dict[str, Any] = {"method": method, "reference": reference, "seeds": seeds}
    compared = [mine[s] for s in seeds] + [theirs[s] for s in seeds]
    over_rounds = len({str(r.get(FEEDBACK_ROUNDS_OF)) for r in compared}) == 1 and all(
        k in r for k in OVER_FEEDBACK_ROUNDS for r in compared
    )  # and the same rounds in every row
    keys = ["reward", "reward-worst", *(OVER_FEEDBACK_ROUNDS if over_rounds else ())]
    for key in keys:
        differences = [mine[s][key] - theirs[s][key] for s in seeds]
        mean = float(np.mean(differences))
        error = float(np.std(differences, ddof=1) / math.sqrt(len(seeds))) if len(seeds) > 1 else None
        result[key] = {"per-seed": differences, "mean": mean, "stderr": error}
    result["ahead"] = sum(d > 0 for d in result["reward"]["per-seed"])
    return result


def reward_model_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every reward-model row (``<algorithm>/none/none+<mode>@<budget>``) against ``none`` at
    its budget, ``fedavg-sft`` and its algorithm's unlimited budget, where they share seeds."""
    found = []
    for method in dict.fromkeys(r["method"] for r in rows):
        if "+" not in method:
            continue
        base, variant = method.split("+", 1)
        budget = variant.rsplit("@", 1)[1]
        references = [f"{base}+none@{budget}", BASELINE, base]
        for reference in references:
            if reference != method:
                pair = paired_difference(rows, method, reference)
                if pair is not None:
                    found.append(pair)
    return found


def markdown_pairs(pairs: list[dict[str, Any]]) -> str:
    """One line per pair: the mean difference ± its standard error, the per-seed differences."""

    def cell(figure: dict[str, Any]) -> str:
        error = "" if figure["stderr"] is None else f" ± {figure['stderr']:.3f}"
        return f"{figure['mean']:+.3f}{error} ({', '.join(f'{d:+.3f}' for d in figure['per-seed'])})"

    lines = [
        "| row | against | reward, mean ± s.e. (per seed) | worst user | ahead on (final) | seeds "
        "| reward over the feedback rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        seeds = ", ".join(str(s) for s in pair["seeds"])
        rounds = cell(pair[OVER_FEEDBACK_ROUNDS[0]]) if OVER_FEEDBACK_ROUNDS[0] in pair else "–"
        lines.append(
            f"| `{pair['method']}` | `{pair['reference']}` | {cell(pair['reward'])} | "
            f"{cell(pair['reward-worst'])} | {pair['ahead']}/{len(pair['seeds'])} | {seeds} | {rounds} |"
        )
    return "\n".join(lines)
