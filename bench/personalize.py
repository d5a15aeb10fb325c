"""The personalize matrix: does feedback teach each user what it wants, beyond one shared model?

    nohup python bench/personalize.py > personalize.log 2>&1 &     # seeds 0-4, every row (resumable)
    python bench/personalize.py --seeds 0 --rows soft-prompt/reinforce code-bandit
    python bench/personalize.py --report                           # the figures of the committed evidence

Per seed, on the ``personalize`` preset (24 users; ``configs/personalize.toml``):

1. the supervised phase, once (``sft-seed-<s>``: the preset's ``sft-rounds`` with
   ``feedback-algorithm = sft``, ``personalization = none``), and its bounds (``flhf bounds``: ``fedavg-sft``,
   ``best-shared-code``, ``oracle``, ``first-L-words``, ``lead-1``, ``lead-2``);
2. each row's feedback phase, started from that model (``init-from``, ``sft-rounds = 0``,
   :data:`FEEDBACK_ROUNDS` rounds, every user in each), so every row of a seed starts alike;
3. ``local-only``: each user alone from scratch (supervised and feedback rounds), no init.

A user's figures in a row: the mean true utility (and its content and length factors) of its
final model (its personalized one, where it has personal parameters) on its held-out documents
(``judgements.json``), with the digests of its summaries; in a bound, ``bounds.json``'s. Each
finished (method, seed) is kept as committed evidence (``bench/results/personalize-runs/``)
and every figure is recomputed from those files, so seeds run in different sessions or on
different machines pool from a clean clone. Figures and targets: :mod:`personalize_figures`
(paired by seed and user, 95% bootstrap intervals, the ratio rule of
:mod:`flhf_core.results.statistics`). Which algorithm, and which row, is best is decided on
the users' reward documents (the last feedback round's ``reward``), never on held-out ones.

Writes ``bench/results/quality.json`` (each method's figures) and
``bench/results/quality-summary.json`` (``"preset": "personalize"``, the best row, the targets).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import PROJECT_DIR, run_flhf, write_result
from personalize_figures import Methods, Users, row_figures, targets

from flhf_core.common import atomic_write_json
from flhf_core.config import RunConfig, load_preset
from flhf_core.data import codes
from flhf_core.data.corpus import load_corpus
from flhf_core.results.tracking import read_metrics
from flhf_core.runs.presets import resolve_preset
from flhf_core.users.profiles import build_profile

PRESET = "personalize"
SEEDS = (0, 1, 2, 3, 4)
# the preset's phases: its supervised rounds are the seed's one supervised run, its remaining
# rounds each row's feedback phase (so a row is what `flhf run personalize` runs, in two parts)
_PHASES = load_preset(resolve_preset(PRESET))
SFT_ROUNDS = int(_PHASES["sft-rounds"])
FEEDBACK_ROUNDS = int(_PHASES["num-server-rounds"]) - SFT_ROUNDS
RESULTS = PROJECT_DIR / "results" / "personalize"
# each finished (method, seed)'s users, committed: the figures come from these files
EVIDENCE = PROJECT_DIR / "bench" / "results" / "personalize-runs"
BOUNDS = ("fedavg-sft", "best-shared-code", "oracle", "first-L-words", "lead-1", "lead-2")
BASELINES = (*BOUNDS, "code-bandit", "local-only")  # never "the best FLHF row"
# what every row's feedback phase runs with beside the preset (its size: see the docstring)
ROW_SETTINGS: tuple[str, ...] = ()
TRIAL: list[str] = []  # --set: overrides for every run of a trial (kept apart in results/)
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
    """A run that completed every round (a failed one also leaves a summary and judgements)."""
    summary = folder / "summary.json"
    return (
        summary.is_file()
        and json.loads(summary.read_text()).get("status") == "completed"
        and (folder / "judgements.json").is_file()
    )


def evidence_path(method: str, seed: int) -> Path:
    return EVIDENCE / method.replace("/", "-") / f"seed-{seed}.json"


def reward_documents_score(folder: Path) -> float:
    """What picks the best, never the held-out documents the table reports on: the users' mean
    reward of their updated models (with their personal parameters) on their own fresh reward
    documents (the train replies' ``reward``, the server rows' ``train-reward``), over the run's
    feedback rounds."""
    rows = read_metrics(folder / "metrics.jsonl")
    rewards = [r["train-reward"] for r in rows if r["scope"] == "server" and r["phase"] == "feedback"]
    if not rewards:
        raise ValueError(f"{folder}: no feedback round to choose on")
    return float(np.mean(rewards))


def user_groups(sft_folder: Path) -> dict[str, dict[str, Any]]:
    """Each user's preference group (the code that best expresses what it wants) and whether it
    has keywords, from the seed's profiles."""
    config = RunConfig.from_saved(json.loads((sft_folder / "config.json").read_text()))
    aspects = load_corpus(config).aspects
    users = len(json.loads((sft_folder / "splits.json").read_text())["users"])
    groups = {}
    for user in range(users):
        profile = build_profile(user, config.user_profiles, aspects, config.seed)
        groups[str(user)] = {
            "group": codes.preferred_code(profile).name,
            "has-keywords": bool(profile.include_keywords or profile.avoid_keywords),
        }
    return groups


def run_users(folder: Path, groups: dict[str, dict[str, Any]]) -> Users:
    """Each user's figures in a finished run: its final model's (its personalized one, where it
    has personal parameters) on its held-out documents."""
    users: Users = {}
    for user, values in json.loads((folder / "judgements.json").read_text())["users"].items():
        suffix = "-personal" if "judged-utility-personal" in values else ""
        digests = values.get(f"summary-digest{suffix}")
        users[user] = {
            **groups[user],
            "reward": float(np.mean(values[f"judged-utility{suffix}"])),
            "content": float(np.mean(values[f"judged-content{suffix}"])),
            "length": float(np.mean(values[f"judged-length{suffix}"])),
            "digests": dict(zip(values["doc-ids"], map(int, digests), strict=True)) if digests else {},
        }
    return users


def keep_evidence(
    method: str, seed: int, folder: Path, groups: dict[str, dict[str, Any]], origin: dict[str, Any]
) -> None:
    """A finished row's users, committed: the figures are recomputed from these files, so seeds
    run on different machines (or sessions) pool from a clean clone. ``origin``: what the row
    ran with (``items``, its overrides resolved, which every seed of a method must share) and
    the ``sft-model`` it started from (which every row of a seed must share)."""
    path = evidence_path(method, seed)
    if path.is_file() or not finished(folder):
        return
    figures = {"users": run_users(folder, groups), "reward-documents": reward_documents_score(folder)}
    atomic_write_json(path, {"method": method, "seed": seed, **origin, **figures})


def keep_bounds_evidence(seed: int, sft_folder: Path, groups: dict[str, dict[str, Any]]) -> None:
    bounds = json.loads((sft_folder / "bounds.json").read_text())
    for method in BOUNDS:
        path = evidence_path(method, seed)
        if not path.is_file():
            users = {u: {**f, **groups[u]} for u, f in bounds["methods"][method].items()}
            extra = {"code": bounds["best-shared-code"]} if method == "best-shared-code" else {}
            record = {"method": method, "seed": seed, "sft-model": sft_model(sft_folder), "users": users}
            atomic_write_json(path, {**record, **extra})


def sft_model(sft_folder: Path) -> str:
    """The seed's supervised model, by the SHA-256 of its weights: every row of a seed must have
    started from it (a seed whose supervised phase ran again elsewhere is another experiment)."""
    return hashlib.sha256((sft_folder / "model" / "model.safetensors").read_bytes()).hexdigest()


def run_once(folder: Path, items: list[str]) -> None:
    """Run ``items`` into ``folder`` unless it finished; a failed or stopped attempt is kept aside."""
    if finished(folder):
        return
    if folder.exists():
        folder.rename(folder.with_name(f"{folder.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}"))
    started = time.perf_counter()
    run_flhf("run", [*items, *TRIAL], RESULTS, folder.name)
    print(f"{folder.name}: {time.perf_counter() - started:.0f} s", flush=True)


def ensure_sft(seed: int) -> Path:
    folder = run_dir("sft", seed)
    if not (folder / "model" / "config.json").is_file():
        items = [PRESET, "feedback-algorithm=sft", "personalization=none", f"num-server-rounds={SFT_ROUNDS}"]
        # evaluated at round 0 and the end only: its bounds are evaluated by flhf bounds
        run_once(folder, [*items, f"evaluate-every={SFT_ROUNDS}", f"seed={seed}"])
    if not (folder / "bounds.json").is_file():
        command = [sys.executable, "-m", "flhf_core.runs.cli", "bounds", str(folder)]
        subprocess.run(command, check=True, cwd=PROJECT_DIR)
    keep_bounds_evidence(seed, folder, user_groups(folder))
    return folder


def run_row(name: str, overrides: list[str], seed: int, best: str | None) -> None:
    if evidence_path(name, seed).is_file():
        return
    if any(BEST in o for o in overrides) and best is None:
        print(f"{name} seed {seed}: waits for the algorithm rows", flush=True)
        return
    sft = ensure_sft(seed)
    folder = run_dir(name.replace("/", "-"), seed)
    items = [*(o.replace(BEST, best or "") for o in overrides), *ROW_SETTINGS]
    # the final model is what every user judges: evaluated at round 0 and the end only
    start = [f"init-from={sft}", "sft-rounds=0", f"num-server-rounds={FEEDBACK_ROUNDS}"]
    start += [f"evaluate-every={FEEDBACK_ROUNDS}"]
    run_once(folder, [PRESET, *items, f"seed={seed}", *start])
    origin = {"items": [*items, *TRIAL], "sft-model": sft_model(sft)}
    keep_evidence(name, seed, folder, user_groups(sft), origin)


def run_local_only(seed: int) -> None:
    if evidence_path("local-only", seed).is_file():
        return
    folder = run_dir("local-only", seed)
    items = ["mode=local-only", "personalization=none", "feedback-learning-rate=0.0003"]
    items += [f"evaluate-every={SFT_ROUNDS + FEEDBACK_ROUNDS}"]  # the final models only
    run_once(folder, [PRESET, *items, f"seed={seed}"])
    keep_evidence("local-only", seed, folder, user_groups(ensure_sft(seed)), {"items": [*items, *TRIAL]})


def load_evidence(seeds: list[int]) -> tuple[Methods, dict[str, dict[int, float]]]:
    """Method -> seed -> users, and each learned row's reward-document score per seed, from the
    committed evidence."""
    methods: Methods = {}
    scores: dict[str, dict[int, float]] = {}
    items: dict[str, tuple[list[str], Path]] = {}  # method -> what its first seed ran with
    starts: dict[int, tuple[str, Path]] = {}  # seed -> the supervised model its rows started from
    for path in sorted(EVIDENCE.glob("*/seed-*.json")):
        found = json.loads(path.read_text())
        if found["seed"] not in seeds:
            continue
        method, seed = found["method"], found["seed"]
        if "items" in found:
            first = items.setdefault(method, (found["items"], path))
            if first[0] != found["items"]:
                raise ValueError(
                    f"{path} ran with {found['items']}, {first[1]} with {first[0]}: not one method"
                )
        if "sft-model" in found:
            first_start = starts.setdefault(seed, (found["sft-model"], path))
            if first_start[0] != found["sft-model"]:
                raise ValueError(f"{path} and {first_start[1]} started from different supervised models")
        methods.setdefault(method, {})[seed] = found["users"]
        if "reward-documents" in found:
            scores.setdefault(method, {})[seed] = found["reward-documents"]
    return methods, scores


def best_algorithm(scores: dict[str, dict[int, float]], seeds: list[int]) -> str | None:
    """The soft-prompt algorithm with the highest mean reward on the users' reward documents
    (never held-out ones), once every algorithm has every seed."""
    rows = {a: scores.get(f"soft-prompt/{a}", {}) for a in ALGORITHMS}
    if not all(set(seeds) <= set(found) for found in rows.values()):
        return None
    return max(ALGORITHMS, key=lambda a: np.mean([rows[a][s] for s in seeds]))


def markdown(figures: dict[str, dict[str, Any]]) -> str:
    """The table: one line per method, best first, with its paired comparisons."""

    def interval(entry: dict[str, Any] | None) -> str:
        if not entry:
            return "–"
        return (
            f"{entry['mean']:+.4f} [{entry['low']:+.4f}, {entry['high']:+.4f}] (±{entry['half-width']:.4f})"
        )

    lines = [
        "| method | seeds | reward | worst user | content | length | gap closed | vs shared baseline "
        "| vs local-only | identical across groups |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, f in sorted(figures.items(), key=lambda item: -item[1]["reward"]):
        gap = f.get("gap-closed")
        same = f.get("identical-across-groups")
        lines.append(
            f"| {method} | {len(f['seeds'])} | {f['reward']:.4f} | {f['reward-worst']:.4f} | "
            f"{f['reward-content']:.3f} | {f['reward-length']:.3f} | {'–' if gap is None else f'{gap:+.2f}'} | "
            f"{interval(f.get('vs-shared'))} | {interval(f.get('vs-local-only'))} | "
            f"{'–' if same is None else f'{same:.0%}'} |"
        )
    return "\n".join(lines)


def best_row(scores: dict[str, dict[int, float]], seeds: list[int]) -> str | None:
    """The FLHF row (feedback-trained, not a baseline) with the highest mean reward on the users'
    reward documents over ``seeds``: the row the targets are checked on."""
    candidates = {m: found for m, found in scores.items() if m not in BASELINES and set(seeds) <= set(found)}
    if not candidates:
        return None
    return max(candidates, key=lambda m: np.mean([candidates[m][s] for s in seeds]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--rows", nargs="+", default=[*rows(), "local-only"], choices=[*rows(), "local-only"])
    parser.add_argument("--report", action="store_true", help="only the figures of the committed evidence")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="a trial of the driver (e.g. a smaller model): every run gets these overrides, and runs, "
        "evidence and figures go to results/personalize-trial/ (bench/results is left alone)",
    )
    args = parser.parse_args()
    if args.set:
        global RESULTS, EVIDENCE, SFT_ROUNDS, FEEDBACK_ROUNDS
        # a trial's sft-rounds and num-server-rounds size its two phases, as the preset's do
        phases = dict(
            item.split("=", 1) for item in args.set if item.startswith(("sft-rounds=", "num-server-rounds="))
        )
        SFT_ROUNDS = int(phases.get("sft-rounds", SFT_ROUNDS))
        FEEDBACK_ROUNDS = int(phases.get("num-server-rounds", SFT_ROUNDS + FEEDBACK_ROUNDS)) - SFT_ROUNDS
        TRIAL.extend(item for item in args.set if not item.startswith(("sft-rounds=", "num-server-rounds=")))
        RESULTS = PROJECT_DIR / "results" / "personalize-trial"
        EVIDENCE = RESULTS / "evidence"
    # the best algorithm belongs to the matrix: chosen on all its seeds, whichever run now
    choice = args.seeds if args.set else list(SEEDS)
    if not args.report:
        for seed in args.seeds:
            ensure_sft(seed)
        for name in args.rows:
            for seed in args.seeds:
                if name == "local-only":
                    run_local_only(seed)
                else:
                    run_row(name, rows()[name], seed, best_algorithm(load_evidence(choice)[1], choice))
    methods, scores = load_evidence(args.seeds)
    figures = row_figures(methods)
    best = best_row(scores, args.seeds)
    found = targets(methods, figures, best, scores)
    print(markdown(figures))
    if best:
        detectable = figures[best].get("vs-shared", {}).get("half-width")
        print(f"\nbest FLHF row (chosen on reward documents): {best}")
        if detectable is not None:
            print(
                f"smallest difference these seeds and users detect against the shared baseline: {detectable:.4f}"
            )
    for target in found:
        status = {True: "met", False: "missed", None: "n/a"}[target["met"]]
        print(
            f"- {target['target']}: {target['value']} (target {target['threshold']}, {target['seeds']} seeds): {status}"
        )
    common = {"preset": PRESET, "feedback-rounds": FEEDBACK_ROUNDS, "seeds": args.seeds}
    quality = {
        **common,
        "best-algorithm": best_algorithm(load_evidence(choice)[1], choice),
        "methods": figures,
    }
    summary = {**common, "best-row": best, "targets": found}
    if args.set:
        atomic_write_json(RESULTS / "quality.json", {**quality, "trial": args.set})
        atomic_write_json(RESULTS / "quality-summary.json", {**summary, "trial": args.set})
        return
    write_result("quality", quality)
    write_result("quality-summary", summary)


if __name__ == "__main__":
    main()
