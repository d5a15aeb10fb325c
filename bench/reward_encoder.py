"""The learned reward model's encoder: a copy of the summarizer's, or the pretrained sentence encoder?

    nohup python bench/reward_encoder.py > reward_encoder.log 2>&1 &   # seed 0 (resumable)
    python bench/reward_encoder.py --rows minilm@32 --seeds 0 1        # some of them
    python bench/reward_encoder.py --report                            # the table again

For each encoder (``reward-model-encoder`` = ``summarizer``, ``minilm``) and budget (8 and 32
judgements per user per feedback round), one ``flhf run`` of the ``reinforce`` preset (6 users,
5 supervised then 3 feedback rounds) with PPO and a personal reward model. From each run's
client rows of the feedback rounds: ``reward-model-accuracy`` (pairs of one document's samples
ordered as the user's true utility orders them; chance 0.5), ``-correlation`` (of the predicted
rating with the true utility) and ``-gap`` (predicted minus true mean utility of the policy's
samples), averaged over users and rounds, and the users' final reward. The reward models are
scored against the simulated user's utility, which nothing trains on.

Writes ``bench/results/reward_encoder.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import PROJECT_DIR, run_flhf, write_result

from flhf_core.results.tracking import read_metrics

ENCODERS = ("summarizer", "minilm")
BUDGETS = (8, 32)
KEYS = ("reward-model-accuracy", "reward-model-correlation", "reward-model-gap")
RESULTS = PROJECT_DIR / "results" / "reward-encoder"


def run_name(encoder: str, budget: int, seed: int) -> str:
    return f"{encoder}@{budget}-seed-{seed}"


def finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "completed"


def figures(run_dir: Path) -> dict:
    """The reward model's diagnostics over the feedback rounds' client rows, and the final reward."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    clients = [r for r in rows if r["scope"] == "client" and r["phase"] == "feedback"]
    result = {key: float(np.mean([r[key] for r in clients if key in r])) for key in KEYS}
    last = max(r["round"] for r in rows)
    server = [r for r in rows if r["scope"] == "server" and r["round"] == last]
    result["reward"] = server[-1].get("reward") if server else None
    return result


def run_seed(encoder: str, budget: int, seed: int) -> Path:
    """The run of ``encoder`` at ``budget`` judgements, seed ``seed``: run, or resumed from its last
    checkpoint when an earlier attempt stopped."""
    name = run_name(encoder, budget, seed)
    run_dir = RESULTS / name
    if finished(run_dir):
        return run_dir
    # a PPO round with a MiniLM reward model takes ~10 min on 2 cores: the default 600 s timeout
    # would fail a round that is merely slow (the figures here are judgements, not times)
    timeout = "round-timeout=3600"
    if (run_dir / "checkpoints" / "latest").is_dir():
        command = [
            sys.executable,
            "-m",
            "flhf_core.runs.cli",
            "run",
            "--resume",
            str(run_dir),
            timeout,
            "--quiet",
        ]
        subprocess.run(command, check=True, cwd=PROJECT_DIR)
        return run_dir
    if run_dir.exists():  # stopped before its first checkpoint: kept aside, run again
        run_dir.rename(run_dir.with_name(f"{name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}"))
    items = ["reinforce", "feedback-algorithm=ppo", "reward-model=personal"]
    items += [f"ratings-per-round={budget}", f"reward-model-encoder={encoder}", f"seed={seed}", timeout]
    run_flhf("run", items, RESULTS, name)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", default=[f"{e}@{b}" for b in BUDGETS for e in ENCODERS])
    parser.add_argument("--report", action="store_true", help="only read finished runs")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = PROJECT_DIR / "bench" / "results" / "reward_encoder.json"
    # rows whose runs this checkout lacks (another machine ran them) keep their figures
    table: dict = json.loads(output.read_text())["rows"] if output.is_file() else {}
    for row in args.rows:
        encoder, budget = row.split("@")
        per_seed = {int(s): f for s, f in table.get(row, {}).get("seeds", {}).items()}
        for seed in args.seeds:
            if not args.report:
                run_seed(encoder, int(budget), seed)
            if finished(RESULTS / run_name(encoder, int(budget), seed)):
                per_seed[seed] = figures(RESULTS / run_name(encoder, int(budget), seed))
        if per_seed:
            mean = {k: float(np.mean([f[k] for f in per_seed.values()])) for k in (*KEYS, "reward")}
            table[row] = {"seeds": per_seed, "mean": mean}
            write_result("reward_encoder", {"rows": table})  # after every row: a stop loses nothing
    print("| encoder @ judgements | seeds | accuracy | correlation | gap | users' reward |")
    print("|---|---|---|---|---|---|")
    for name, entry in table.items():
        m = entry["mean"]
        print(
            f"| {name} | {len(entry['seeds'])} | {m['reward-model-accuracy']:.3f} | "
            f"{m['reward-model-correlation']:.3f} | {m['reward-model-gap']:+.3f} | {m['reward']:.3f} |"
        )


if __name__ == "__main__":
    main()
