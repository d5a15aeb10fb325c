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
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import PROJECT_DIR, RESULTS_DIR, commit, machine
from paired import markdown_pairs, reward_model_pairs
from quality_figures import (
    BASELINE,
    WEIGHTINGS,
    aggregate,
    feedback_rounds_figures,
    on_common_seeds,
    reward_model_figures,
    run_figures,
    targets,
)
from quality_markdown import markdown, markdown_reward_models

from flhf_core.common import atomic_write_json
from flhf_core.learning.algorithms import OBJECTIVE_VERSIONS
from flhf_core.results.tracking import read_metrics

PRESET = "reinforce"
SEEDS = (0, 1, 2)
ALGORITHMS = ("best-of-n", "reinforce", "ppo", "dpo")
PERSONALIZATIONS = ("lora", "local-head")
BEST = "{best}"  # stands for the best algorithm until the algorithm rows are in
EVIDENCE_DIR = RESULTS_DIR / "quality-runs"
EVIDENCE_FILES = ("judgements.json", "summary.json", "config.json")
OPTIONAL_EVIDENCE = ("metrics.jsonl",)  # kept since issue 13; required of reward-model rows ("+")
REWARD_MODELS = ("personal", "federated", "clustered")
BUDGETS = (32, 8)  # judgements per user per feedback round (the preset samples 10 x 8 x 4 = 320)


def methods() -> dict[str, list[str]]:
    """Method name -> the ``flhf run`` overrides on the preset (``{best}``: the best algorithm),
    in the order they run: those that decide the best algorithm first, then the comparisons
    the targets need most."""
    best = f"feedback-algorithm={BEST}"
    table = {
        BASELINE: ["feedback-algorithm=sft"],
        **{f"{a}/none/none": [f"feedback-algorithm={a}"] for a in ALGORITHMS},
        "centralized": ["mode=centralized", "feedback-algorithm=sft"],
        f"{BEST}/none/lora": [best, "personalization=lora"],
    }
    for weighting in ("history", "softmax", "qfedavg"):
        table[f"{BEST}/{weighting}/none"] = [best, f"reward-weighting={weighting}"]
    table["local-only"] = ["mode=local-only", best]
    table[f"centralized/{BEST}"] = ["mode=centralized", best]
    for weighting in WEIGHTINGS:
        table.setdefault(f"{BEST}/{weighting}/none", [best, f"reward-weighting={weighting}"])
    for mode in PERSONALIZATIONS:
        table.setdefault(f"{BEST}/none/{mode}", [best, f"personalization={mode}"])
    # issue 13: a few judgements per round, and a learned reward model for the rest
    for budget in BUDGETS:
        for reward_model in (*REWARD_MODELS, "none"):  # none: only the judged samples teach
            table[reward_model_method(BEST, reward_model, budget)] = [
                best,
                f"ratings-per-round={budget}",
                f"reward-model={reward_model}",
            ]
    variants = {  # at 8 judgements: what active queries save, and a shared encoder with personal heads
        "personal-active": ["reward-model=personal", "reward-queries=active"],
        "federated-head": ["reward-model=federated", "reward-model-personal-head=true"],
    }
    # at 8 the gate stays shut within three feedback rounds (at most ~21 checked pairs), so the
    # gated modes train the same policy; without the gate, whether sharing the reward model
    # helps the users is measured where the models are used
    for mode in REWARD_MODELS:
        variants[f"{mode}-ungated"] = [f"reward-model={mode}", "reward-model-trust=0"]
    for variant, items in variants.items():
        table[reward_model_method(BEST, variant, 8)] = [best, "ratings-per-round=8", *items]
    # the control of every learned row: a personal model the gate almost never lets score (a
    # bound of 0.9 needs ~25 agreeing pairs in a row; its row's "RM used" says whether it ever
    # did). It learns, and its training draws random numbers,
    # so the run follows other random streams than `none`'s; what differs from it is that alone.
    table[reward_model_method(BEST, "personal-shut", 32)] = [
        best,
        "ratings-per-round=32",
        "reward-model=personal",
        "reward-model-trust=0.9",
    ]
    return table


def reward_model_method(algorithm: str, reward_model: str, budget: int) -> str:
    """``ppo/none/none+personal@8``: the algorithm with FedAvg, no personalization, a budget of
    8 judgements per round and a personal reward model (``personal-active``: with active
    queries; ``federated-head``: a federated encoder with personal heads; ``-ungated``: the
    gate off; ``personal-shut``: a personal model the gate keeps shut, the control)."""
    return f"{algorithm}/none/none+{reward_model}@{budget}"


# --------------------------------------------------------------------------
# Running the matrix
# --------------------------------------------------------------------------
def slug(method: str) -> str:
    return method.replace("/", "_")


def current_objective(run_dir: Path) -> bool:
    """Whether the kept run was made under its algorithm's current objective
    (:data:`flhf_core.learning.algorithms.OBJECTIVE_VERSIONS`; version 1 before versions were kept)."""
    algorithm = json.loads((run_dir / "config.json").read_text())["feedback-algorithm"]
    made = json.loads((run_dir / "bench.json").read_text()).get("objective", 1)
    return made == OBJECTIVE_VERSIONS[algorithm]


def completed(run_dir: Path, retime: bool = False) -> bool:
    """Whether ``run_dir`` (a run's kept evidence) holds a completed run's files, made under its
    algorithm's current objective (an older one's figures are not this code's: it runs again);
    with ``retime``, also that its wall time was measured alone (not marked ``contended``)."""
    needed = ("bench.json", *EVIDENCE_FILES, *(OPTIONAL_EVIDENCE if "+" in run_dir.parent.name else ()))
    if not all((run_dir / name).is_file() for name in needed):  # a reward model's row needs its metrics
        return False  # bench.json is written last: without it the rest may be half-copied
    if retime and json.loads((run_dir / "bench.json").read_text()).get("contended"):
        return False
    if not current_objective(run_dir):
        return False
    return json.loads((run_dir / "summary.json").read_text()).get("status") == "completed"


def command_line(items: list[str], seed: int) -> str:
    return " ".join(["flhf", "run", PRESET, *items, f"seed={seed}"])


def keep_evidence(run_dir: Path, evidence: Path, bench: dict[str, Any]) -> None:
    """Copy what the figures are computed from into ``evidence``; ``bench.json`` last, so a
    folder with it is whole."""
    evidence.mkdir(parents=True, exist_ok=True)
    (evidence / "bench.json").unlink(missing_ok=True)  # a folder being refilled is not whole
    for name in EVIDENCE_FILES:
        shutil.copyfile(run_dir / name, evidence / name)
    for name in OPTIONAL_EVIDENCE:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, evidence / name)
    atomic_write_json(evidence / "bench.json", bench)


def run_one(results_dir: Path, evidence_dir: Path, method: str, items: list[str], seed: int) -> None:
    """Run one configuration in the scratch folder (moving an interrupted attempt aside), then
    keep its evidence with its wall time and selection score."""
    run_dir = results_dir / slug(method) / f"seed-{seed}"
    if run_dir.exists():
        attempts = len(list(run_dir.parent.glob(f"{run_dir.name}.interrupted-*")))
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.interrupted-{attempts}"))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "flhf_core.runs.cli", "run", PRESET, *items, f"seed={seed}", "--quiet"]
    command += [f"results-dir={run_dir.parent}", f"run-name={run_dir.name}"]
    print(f"{method} seed {seed}: {command_line(items, seed)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=PROJECT_DIR)
    seconds = time.perf_counter() - started
    algorithm = json.loads((run_dir / "config.json").read_text())["feedback-algorithm"]
    bench = {
        "seconds": seconds,
        "command": command_line(items, seed),
        "commit": commit(),
        "machine": machine(),
        "objective": OBJECTIVE_VERSIONS[algorithm],
    }
    if algorithm != "sft":
        bench["selection-score"] = selection_score(read_metrics(run_dir / "metrics.jsonl"))
    evidence = evidence_dir / slug(method) / f"seed-{seed}"
    kept = evidence / "judgements.json"
    # a run of an older objective is replaced (its loss changed); one of the current objective
    # must be reproduced
    if (
        (evidence / "bench.json").is_file()
        and current_objective(evidence)
        and kept.is_file()
        and json.loads(kept.read_text()) != json.loads((run_dir / "judgements.json").read_text())
    ):
        raise RuntimeError(  # a retimed run must reproduce its figures: its seed alone decides them
            f"{method} seed {seed} ran again and judged differently from its kept evidence in {evidence}: "
            f"the run is not deterministic here; the new run is in {run_dir}, the evidence is unchanged"
        )
    keep_evidence(run_dir, evidence, bench)
    print(f"{method} seed {seed}: {seconds:.0f} s", flush=True)


def selection_score(rows: list[dict[str, Any]]) -> float:
    """What picks the best algorithm, never the held-out documents the table reports on: the
    users' mean reward of their updated models on their own fresh reward documents (the train
    replies' ``reward``), over the feedback rounds of a run's metrics ``rows``."""
    rewards = [r["train-reward"] for r in rows if r["scope"] == "server" and r["phase"] == "feedback"]
    if not rewards:
        raise ValueError("no feedback round to select on")
    return float(np.mean(rewards))


def best_algorithm(evidence_dir: Path, seeds: tuple[int, ...], declared: str | None = None) -> str | None:
    """The feedback algorithm with the highest mean :func:`selection_score` over ``seeds``, once
    all its runs are in; until then ``declared`` (``--best``: the choice of an earlier pass whose
    evidence is not here), which the algorithm rows must confirm once they are in. The matrix
    asks over all of :data:`SEEDS`, whatever ``--seeds`` runs now: the choice belongs to the
    matrix, and a run of one seed must not follow that seed's own choice."""
    means = {}
    for algorithm in ALGORITHMS:
        dirs = [evidence_dir / slug(f"{algorithm}/none/none") / f"seed-{s}" for s in seeds]
        if not all(completed(d) for d in dirs):
            return declared
        means[algorithm] = np.mean(
            [json.loads((d / "bench.json").read_text())["selection-score"] for d in dirs]
        )
    best = max(means, key=means.get)
    if declared is not None and declared != best:
        raise ValueError(
            f"--best {declared}: the algorithm rows choose {best} (selection scores {means}); "
            f"the rows run with {declared} must be run again with {best}"
        )
    return best


def resolve(method: str, items: list[str], best: str | None) -> tuple[str, list[str]] | None:
    if BEST not in method and not any(BEST in i for i in items):
        return method, items
    if best is None:
        return None
    return method.replace(BEST, best), [i.replace(BEST, best) for i in items]


def missing(
    evidence_dir: Path,
    seeds: tuple[int, ...],
    best: str | None,
    only: list[str] | None = None,
    retime: bool = False,
) -> tuple[list, int]:
    """The runs still to do that can be named now (of the methods ``only`` names, in its order,
    if given; with ``retime``, also those whose wall time is marked contended), and how many
    wait for the best algorithm."""
    todo, waiting = [], 0
    for method, items in methods().items():
        resolved = resolve(method, items, best)
        if resolved is None:
            waiting += len(seeds)
            continue
        name, overrides = resolved
        if only is not None and name not in only:
            continue
        todo += [
            (name, overrides, seed)
            for seed in seeds
            if not completed(evidence_dir / slug(name) / f"seed-{seed}", retime)
        ]
    if only is not None:
        todo.sort(key=lambda run: only.index(run[0]))
    return todo, waiting


def run_matrix(
    results_dir: Path,
    evidence_dir: Path,
    seeds: tuple[int, ...],
    declared: str | None = None,
    only: list[str] | None = None,
    retime: bool = False,
) -> None:
    """Every missing run: first those that need no best algorithm (they decide it), then the rest,
    until nothing that can be named is left (a failed run stops the matrix: its error shows)."""
    while True:
        best = best_algorithm(evidence_dir, SEEDS, declared)
        todo, _waiting = missing(evidence_dir, seeds, best, only, retime)
        if not todo:
            return
        for number, (name, overrides, seed) in enumerate(todo, start=1):
            print(f"[{number}/{len(todo)}] ", end="", flush=True)
            run_one(results_dir, evidence_dir, name, overrides, seed)


def plan(evidence_dir: Path, seeds: tuple[int, ...], declared: str | None = None) -> None:
    todo, waiting = missing(evidence_dir, seeds, best_algorithm(evidence_dir, SEEDS, declared))
    for name, overrides, seed in todo:
        print(f"to run: {command_line(overrides, seed)}   ({name})")
    done = [
        json.loads(p.read_text())["seconds"]
        for p in evidence_dir.glob("*/seed-*/bench.json")
        if completed(p.parent)
    ]
    per_run = float(np.mean(done)) if done else float("nan")
    left = len(todo) + waiting
    print(
        f"{len(done)} runs finished, {len(todo)} to run now, {waiting} waiting for the best algorithm; "
        f"{per_run:.0f} s per run here: about {left * per_run / 3600:.1f} h to go, "
        f"{(left + len(done)) * per_run / 3600:.1f} h for the whole matrix"
    )


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
