"""The quality matrix of ``bench/quality.py``: its rows (method -> ``flhf run`` overrides), running
the missing ones one at a time, keeping each run's evidence under ``bench/results/quality-runs``,
and choosing the best feedback algorithm on the users' fresh reward documents."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import PROJECT_DIR, RESULTS_DIR, commit, machine
from quality_figures import BASELINE, WEIGHTINGS

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
