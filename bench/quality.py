"""The evidence: does feedback, reward-aware aggregation and personalization beat plain FedAvg?

    python bench/quality.py                 # run what is missing of the matrix, then the table
    python bench/quality.py --table-only    # the table from the runs already finished
    python bench/quality.py --plan          # the commands, and how long the rest should take

Runs a matrix on the ``reinforce`` preset (6 users, ``aspects`` profiles, ``preference``
partitioning, 5 supervised then 3 feedback rounds) for 3 seeds, one ``flhf run`` at a time
(side by side they would slow each other down on a small machine):

* the baselines: ``fedavg-sft`` (FedAvg, supervised rounds only), ``local-only`` (each user
  alone, with the best algorithm's feedback), ``centralized`` (one learner with every user's
  data, supervised only) and ``centralized/<best>`` (with every user's feedback);
* FedAvg with each feedback algorithm (``<algorithm>/none/none``);
* the best algorithm with each reward weighting, q-FedAvg included (``<best>/<weighting>/none``),
  and with each personalization (``<best>/none/<mode>``). The best is chosen on the users'
  fresh reward documents (:func:`selection_score`), never on the held-out documents reported.

Every figure is read from the run's ``judgements.json``: each user's true utility of its
model's greedy summary of each held-out document (the personalized model where there is one:
the model the user uses). Nothing there steers training. Per run (and seed):

* ``reward``, ``reward-worst``, ``reward-std``: mean, worst and spread over users of the
  users' mean utility;
* ``win-rate``: against ``fedavg-sft`` of the same seed, the Bradley-Terry probability under
  each user's true utility that the user prefers the method's summary of a document,
  sigmoid((u_method - u_fedavg-sft) / T_user), averaged over documents, then users;
* ``rougeL``: ROUGE-L F1 (x100) against each user's preferred aspect, averaged the same way;
* ``bytes``: bytes up and down per round; ``seconds``: the run's wall time here (null when
  its ``bench.json`` says ``"contended": true``: it ran beside other work; ``--retime`` runs
  it again alone, which changes no other figure: a run's figures depend only on its seed);
* ``command``: the ``flhf run`` command line that reproduces the row.

Each run goes to a scratch folder (``--results-dir``: models, checkpoints, logs). What the
figures are computed from is kept in ``bench/results/quality-runs/<method>/seed-<n>/``, a few
small JSON files that are committed: ``judgements.json`` (every user's per-document utility and
ROUGE-L), ``summary.json``, ``config.json`` and ``bench.json`` (wall time, command, commit, the
selection score and the version of the algorithm's objective it ran under). So the table
can be recomputed, audited and extended on any clone, and a matrix spread over several
machines loses nothing when one goes away.

Resumable: a run with kept evidence is never run again, unless its algorithm's objective has
changed since (``flhf_core.learning.algorithms.OBJECTIVE_VERSIONS``: its figures are no longer this
code's, and comparing them with new runs would compare two losses); an interrupted one is
moved aside and run again. Run it under ``nohup``: the whole matrix takes hours on 2 cores
(``--plan`` says how many, from the runs finished so far). Writes ``bench/results/quality.json`` (one object per
method and seed), ``quality-summary.json`` (means, spreads, targets) and prints the Markdown
table that BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import PROJECT_DIR, RESULTS_DIR, commit, machine
from paired import markdown_pairs, reward_model_pairs
from quality_figures import (
    BASELINE,
    aggregate,
    feedback_rounds_figures,
    on_common_seeds,
    reward_model_figures,
    run_figures,
)
from quality_markdown import markdown, markdown_reward_models
from quality_matrix import (
    ALGORITHMS,
    EVIDENCE_DIR,
    PRESET,
    SEEDS,
    best_algorithm,
    completed,
    methods,
    plan,
    resolve,
    run_matrix,
    slug,
)
from quality_targets import targets

from flhf_core.common import atomic_write_json


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------
def collect(evidence_dir: Path, seeds: tuple[int, ...], declared: str | None = None) -> list[dict[str, Any]]:
    """One row per finished method and seed (quality.json)."""
    best = best_algorithm(evidence_dir, SEEDS, declared)
    rows = []
    for method, items in methods().items():
        resolved = resolve(method, items, best)
        if resolved is None:
            continue
        name, _ = resolved
        for seed in seeds:
            run_dir = evidence_dir / slug(name) / f"seed-{seed}"
            baseline = evidence_dir / slug(BASELINE) / f"seed-{seed}"
            if not completed(run_dir):
                continue
            bench = json.loads((run_dir / "bench.json").read_text())
            figures = run_figures(run_dir, baseline if completed(baseline) else None)
            figures.update(reward_model_figures(run_dir))
            figures.update(feedback_rounds_figures(run_dir, figures["reward"]))
            rows.append(
                {
                    "method": name,
                    "seed": seed,
                    **figures,
                    # a wall time measured beside other work is no wall time: left out
                    "seconds": None if bench.get("contended") else bench["seconds"],
                    "command": bench["command"],
                    "commit": bench.get("commit"),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default="results/quality", help="scratch folder of the runs")
    parser.add_argument(
        "--evidence-dir", default=str(EVIDENCE_DIR), help="where each run's evidence is kept (committed)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--plan", action="store_true", help="print what is left to run, run nothing")
    parser.add_argument("--table-only", action="store_true", help="run nothing; table of what is finished")
    parser.add_argument(
        "--best",
        choices=ALGORITHMS,
        help="the best algorithm, chosen by an earlier pass whose algorithm rows are not here yet "
        "(they must confirm it once they are in)",
    )
    parser.add_argument("--methods", nargs="+", help="run only these methods, in this order")
    parser.add_argument(
        "--retime",
        action="store_true",
        help="also run again the runs whose bench.json is marked contended (timed beside other work)",
    )
    parser.add_argument(
        "--replace-table",
        action="store_true",
        help="write quality.json even if it then holds fewer rows than the committed one",
    )
    args = parser.parse_args()
    results_dir = (PROJECT_DIR / args.results_dir).resolve()
    evidence_dir = (PROJECT_DIR / args.evidence_dir).resolve()
    seeds = tuple(args.seeds)
    if args.methods:
        best = best_algorithm(evidence_dir, SEEDS, args.best)
        known = {resolved[0] for m, i in methods().items() if (resolved := resolve(m, i, best))}
        unknown = [m for m in args.methods if m not in known]
        if unknown:
            raise SystemExit(f"--methods: {unknown} are not in the matrix; known now: {sorted(known)}")
    if args.plan:
        plan(evidence_dir, seeds, args.best)
        return
    if not args.table_only:
        run_matrix(results_dir, evidence_dir, seeds, args.best, args.methods, args.retime)
    rows = collect(evidence_dir, seeds, args.best)
    table = aggregate(rows)
    best = best_algorithm(evidence_dir, SEEDS, args.best)
    RESULTS_DIR.mkdir(exist_ok=True)
    committed = RESULTS_DIR / "quality.json"
    if committed.is_file() and len(json.loads(committed.read_text())) > len(rows) and not args.replace_table:
        print(markdown(table))
        raise SystemExit(
            f"{committed} holds more rows than the {len(rows)} with evidence in {evidence_dir}: not "
            "overwritten (pass --replace-table to replace it)"
        )
    atomic_write_json(committed, rows)
    found = targets(on_common_seeds(rows), best)
    pairs = reward_model_pairs(rows)
    atomic_write_json(
        RESULTS_DIR / "quality-summary.json",
        {
            "benchmark": "quality",
            "commit": commit(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": machine(),
            "preset": PRESET,
            "best-algorithm": best,
            # False: declared with --best, its algorithm rows are not all in yet to confirm it
            "best-algorithm-confirmed": best_algorithm(evidence_dir, SEEDS) is not None,
            "matrix-seconds": sum(r["seconds"] or 0.0 for r in rows),
            "methods": table,
            "targets": found,
            "paired": pairs,  # seed by seed: see bench/paired.py
        },
    )
    print(markdown(table))
    if any("+" in method for method in table):
        print()
        print(markdown_reward_models(table))
        print()
        print(markdown_pairs(pairs))
    for item in found:
        value = "n/a" if item["value"] is None else f"{item['value']:.3f}"
        seeds = f", {item['seeds']} seed{'s' * (item['seeds'] != 1)}" if "seeds" in item else ""
        print(
            f"- {'met' if item['met'] else 'MISSED'}: {item['target']}: {value} "
            f"(target {item['threshold']}{seeds})" + (f": {item['note']}" if "note" in item else "")
        )
    print(f"{len(rows)} runs, {sum(r['seconds'] or 0.0 for r in rows) / 3600:.1f} h of wall time here")


if __name__ == "__main__":
    main()
