"""Issue 13's rows over rounds: the held-out reward and the reward model's accuracy per round
at each feedback budget, from the matrix's kept evidence (no run).

    python bench/budget_figure.py        # writes bench/results/budget.png and budget.json

One panel per budget (judgements per user and feedback round): for each reward-model mode
(``ppo/none/none+<mode>@<budget>``), the seed mean of the held-out reward of each round's
model, from the last supervised round on, beside two references from ``quality.json``: the
final reward of PPO with an unlimited budget and of ``fedavg-sft``. A panel is drawn over the
seeds all its modes have, its references over the same seeds. Below it, the
learned reward model's ranking accuracy on the users' true preferences (0.5 = chance) and its
agreement with their own judgements as the gate saw it. A final figure hides a path: a row
that ends low may have been best after its first feedback round (BENCHMARKS). In the JSON,
budgets and rounds are keys, so strings.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS_DIR
from quality_figures import BASELINE
from quality_matrix import current_objective

from flhf_core.common import atomic_write_json
from flhf_core.results.tracking import read_metrics

ROW = re.compile(r"^(?P<algorithm>[^+]+)\+(?P<mode>[a-z-]+)@(?P<budget>\d+)$")
CURVES = ("reward", "reward-worst", "reward-model-accuracy", "reward-model-heldout-accuracy")


def run_curves(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """One run's server rows -> figure -> round -> value, from the last supervised round that
    was evaluated on (the point feedback starts from)."""
    server = [r for r in rows if r["scope"] == "server" and "reward" in r]
    supervised = [r["round"] for r in server if r["phase"] != "feedback"]
    start = max(supervised, default=0)
    curves: dict[str, dict[int, float]] = {key: {} for key in CURVES}
    for row in server:
        if row["round"] >= start:
            for key in CURVES:
                if row.get(key) is not None:
                    curves[key][row["round"]] = float(row[key])
    return curves


def budget_curves(evidence_dir: Path) -> dict[int, dict[str, dict[str, Any]]]:
    """budget -> mode -> {figure: {round: seed mean}, "seeds": n, "seed-list": [...]}, over the
    evidence of every reward-model row (``<algorithm>+<mode>@<budget>``) that kept its metrics
    (and was made under its algorithm's current objective), over the seeds every mode of the
    budget has: a mode of one seed beside one of three would compare seeds as much as modes.
    When the modes share no seed, each is drawn over its own, and the panel's title says so."""
    runs: dict[tuple[int, str], dict[int, dict[str, dict[int, float]]]] = defaultdict(dict)
    for metrics in sorted(evidence_dir.glob("*/seed-*/metrics.jsonl")):
        method = metrics.parent.parent.name.replace("_", "/")
        match = ROW.match(method)
        stale = (metrics.parent / "bench.json").is_file() and not current_objective(metrics.parent)
        if match and not stale:
            seed = int(metrics.parent.name.removeprefix("seed-"))
            runs[(int(match["budget"]), match["mode"])][seed] = run_curves(read_metrics(metrics))
    shared: dict[int, set[int]] = {}
    for (budget, _), by_seed in runs.items():
        shared[budget] = shared.get(budget, set(by_seed)) & set(by_seed)
    out: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (budget, mode), by_seed in sorted(runs.items()):
        seeds = sorted(shared[budget]) or sorted(by_seed)  # none shared: each mode over its own
        curves = [by_seed[s] for s in seeds]
        entry: dict[str, Any] = {"seeds": len(curves), "seed-list": seeds}
        for key in CURVES:
            rounds = sorted({r for c in curves for r in c[key]})
            # a round counts only where every seed has it: a mean over fewer seeds would jump
            entry[key] = {
                r: float(np.mean([c[key][r] for c in curves]))
                for r in rounds
                if all(r in c[key] for c in curves)
            }
        out[budget][mode] = entry
    return dict(out)


def references(
    table_rows: list[dict[str, Any]], best: str, seeds: set[int] | None = None
) -> dict[str, float]:
    """The final held-out reward of the references, mean over ``seeds`` (default: theirs): the
    best algorithm (issue 13's rows run it) with an unlimited budget, and ``fedavg-sft``."""
    found = {}
    for method, label in ((f"{best}/none/none", f"{best}, unlimited budget"), (BASELINE, BASELINE)):
        rewards = [
            r["reward"] for r in table_rows if r["method"] == method and (seeds is None or r["seed"] in seeds)
        ]
        if rewards:
            found[label] = float(np.mean(rewards))
    return found


def panel_seeds(by_mode: dict[str, dict[str, Any]]) -> set[int]:
    """The seeds a budget's panel is drawn over."""
    return {seed for entry in by_mode.values() for seed in entry["seed-list"]}


def plot(
    curves: dict[int, dict[str, dict[str, Any]]], lines: dict[int, dict[str, float]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    budgets = sorted(curves, reverse=True)
    modes = sorted({mode for by_mode in curves.values() for mode in by_mode})
    colors = {mode: f"C{k}" for k, mode in enumerate(modes)}  # one colour per mode in every panel
    fig, axes = plt.subplots(2, len(budgets), figsize=(6 * len(budgets), 7), sharex=True, squeeze=False)
    for column, budget in enumerate(budgets):
        top, bottom = axes[0][column], axes[1][column]
        for mode, entry in sorted(curves[budget].items()):
            label = f"{mode} ({entry['seeds']} seed{'s' if entry['seeds'] > 1 else ''})"
            color = colors[mode]
            top.plot(
                *zip(*sorted(entry["reward"].items()), strict=True), marker="o", color=color, label=label
            )
            if entry["reward-model-accuracy"]:
                accuracy = sorted(entry["reward-model-accuracy"].items())
                bottom.plot(*zip(*accuracy, strict=True), marker="o", color=color, label=mode)
            if entry["reward-model-heldout-accuracy"]:
                checks = sorted(entry["reward-model-heldout-accuracy"].items())
                bottom.plot(*zip(*checks, strict=True), linestyle="--", color=color)
        for (label, value), style in zip(lines.get(budget, {}).items(), (":", "-."), strict=False):
            top.axhline(value, color="grey", linestyle=style, label=f"{label} (final)")
        seeds = sorted(panel_seeds(curves[budget]))
        named = f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
        if len({tuple(entry["seed-list"]) for entry in curves[budget].values()}) > 1:
            named += "; the modes on different seeds"
        top.set_title(f"{budget} judgements per user and feedback round ({named})")
        top.set_ylabel("held-out reward (seed mean)")
        top.legend(fontsize=8)
        bottom.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        bottom.set_ylabel("reward-model accuracy\n(solid: true preferences; dashed: gate's checks)")
        bottom.set_xlabel("round (the first point: the last supervised round)")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--evidence-dir", type=Path, default=RESULTS_DIR / "quality-runs")
    parser.add_argument("--table", type=Path, default=RESULTS_DIR / "quality.json")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "budget")
    args = parser.parse_args()
    curves = budget_curves(args.evidence_dir)
    if not curves:
        raise SystemExit(f"no reward-model rows with metrics in {args.evidence_dir}")
    summary = args.table.with_name("quality-summary.json")
    best = json.loads(summary.read_text()).get("best-algorithm") if summary.is_file() else None
    table = json.loads(args.table.read_text()) if args.table.is_file() else []
    lines = {b: references(table, best or "ppo", panel_seeds(by_mode)) for b, by_mode in curves.items()}
    atomic_write_json(args.out.with_suffix(".json"), {"curves": curves, "references": lines})
    plot(curves, lines, args.out.with_suffix(".png"))
    for budget, modes in sorted(curves.items(), reverse=True):
        for mode, entry in sorted(modes.items()):
            path = " → ".join(f"{v:.3f}" for _, v in sorted(entry["reward"].items()))
            print(f"@{budget} {mode:16s} (seeds {entry['seed-list']}): {path}")
    print(f"wrote {args.out.with_suffix('.png')} and .json")


if __name__ == "__main__":
    main()
