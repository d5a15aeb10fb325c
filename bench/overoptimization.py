"""Over-optimization made visible: the reward the policy is trained on against what the users get.

    python bench/overoptimization.py                 # run it (about an hour on 2 cores), then plot
    python bench/overoptimization.py --plot-only     # plot the run in --results-dir again (PNG only)

One run of the ``reinforce`` preset with PPO, a budget of 8 judgements per user and round and a
personal learned reward model (issue 13), always used (``reward-model-trust = 0``; the
committed run predates the gate, which is the same), with 12 feedback rounds after the 5
supervised ones: long enough for the policy to find what the reward model overrates. Per feedback round, from
the server's rows (means over users):

* ``reward-model-score``: the learned reward (sigmoid r) of the policy's samples it scored;
* ``reward-model-utility``: the users' true utility of the same samples (the gap is the first
  minus the second: Gao et al., 2023, https://arxiv.org/abs/2210.10760, plot the same two);
* ``reward``: the users' true utility of the round's model on held-out documents (greedy);
* ``reward-model-accuracy`` and ``-correlation``: how well the learned reward ranks the
  samples, against the true utility.

Writes ``bench/results/overoptimization.json`` (the series, with the command) and
``overoptimization.png`` (docs/feedback.md shows it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import PROJECT_DIR, RESULTS_DIR, run_flhf, write_result

from flhf_core.results.tracking import read_metrics

ITEMS = [
    "reinforce",
    "feedback-algorithm=ppo",
    "ratings-per-round=8",
    "reward-model=personal",
    "reward-model-trust=0",  # the gate off: what a reward model does to the policy when always used
    "num-server-rounds=17",
]
SERIES = (
    "reward-model-score",
    "reward-model-utility",
    "reward-model-gap",
    "reward-model-accuracy",
    "reward-model-correlation",
)


def series(rows: list[dict]) -> dict[str, list]:
    """Per feedback round: the learned reward, the true utility, and the held-out reward of the
    round's model (from the row of that round; None where a figure is missing)."""
    server = [r for r in rows if r["scope"] == "server"]
    feedback = [r for r in server if r["phase"] == "feedback"]
    out: dict[str, list] = {"round": [r["round"] for r in feedback]}
    for key in (*SERIES, "reward", "reward-worst"):
        out[key] = [r.get(key) for r in feedback]
    supervised = [r for r in server if r["phase"] == "sft" and "reward" in r]
    out["reward-before-feedback"] = [supervised[-1]["reward"]] if supervised else []
    return out


def plot(figures: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = figures["round"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for key, label in (
        ("reward-model-score", "learned reward of the policy's samples"),
        ("reward-model-utility", "users' true utility of the same samples"),
        ("reward", "users' true utility, held-out documents (greedy)"),
    ):
        points = [(x, y) for x, y in zip(rounds, figures[key], strict=True) if y is not None]
        if points:
            top.plot(*zip(*points, strict=True), marker="o", label=label)
    if figures["reward-before-feedback"]:
        top.axhline(
            figures["reward-before-feedback"][0],
            color="grey",
            linestyle=":",
            label="held-out, after the supervised rounds",
        )
    top.set_ylabel("reward")
    top.legend(fontsize=8)
    top.set_title("PPO on a personal learned reward model, 8 judgements per user and round")
    for key in ("reward-model-accuracy", "reward-model-correlation"):
        points = [(x, y) for x, y in zip(rounds, figures[key], strict=True) if y is not None]
        if points:
            bottom.plot(*zip(*points, strict=True), marker="o", label=key)
    bottom.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("round (feedback rounds; 1-5 were supervised)")
    bottom.set_ylabel("against the true utility")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default="results/overoptimization")
    parser.add_argument("--plot-only", action="store_true", help="plot the finished run, run nothing")
    args = parser.parse_args()
    results = (PROJECT_DIR / args.results_dir).resolve()
    if args.plot_only:
        seconds, rows = None, read_metrics(results / "overoptimization" / "metrics.jsonl")
    else:
        seconds, rows = run_flhf("run", ITEMS, results, "overoptimization")
    figures = series(rows)
    for values in zip(figures["round"], *(figures[k] for k in SERIES), strict=True):
        print("round {}: score {} utility {} gap {} accuracy {} correlation {}".format(*values))
    if not args.plot_only:  # the figures belong with the run that made them
        write_result(
            "overoptimization",
            {"command": "flhf run " + " ".join(ITEMS), "seconds": seconds, "series": figures},
        )
    plot(figures, RESULTS_DIR / "overoptimization.png")
    print(f"wrote {RESULTS_DIR / 'overoptimization.png'}")


if __name__ == "__main__":
    main()
