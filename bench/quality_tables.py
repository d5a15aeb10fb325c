"""The README's quality tables: feedback algorithms, and personalization modes, on their presets.

    python bench/quality_tables.py feedback          [--results-dir results/bench]
    python bench/quality_tables.py personalization   [--results-dir results/bench]

Each table is a list of ``flhf run`` commands, run one after the other (never side by
side: on a small machine they would slow each other down). Resumable: a run whose
``summary.json`` says ``completed`` is not run again, so the command can be restarted
after an interruption (run it under ``nohup``: a table takes 30-60 minutes on 2 cores).
Prints the table in Markdown and writes it to ``<results-dir>/<table>.json``.

Every reward here is the users' true utility of the global (or personalized) model's
greedy summaries of the server's held-out documents, which nothing in training, weighting
or selection ever sees; each user judges by its own profile.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from flhf_core.common import atomic_write_json
from flhf_core.results.tracking import read_metrics

FEEDBACK_RUNS = {
    "sft": ["sft"],
    "best-of-n": ["best-of-n"],
    "reinforce": ["reinforce"],
    "ppo": ["ppo"],
    "dpo": ["dpo"],
    "reinforce-softmax": ["reinforce", "reward-weighting=softmax"],
}
PERSONALIZATION = ["default", "partitioning=preference", "user-profiles=aspects"]
PERSONALIZATION_RUNS = {
    "none": [*PERSONALIZATION, "personalization=none"],
    "lora": [*PERSONALIZATION, "personalization=lora"],
    "local-head": [*PERSONALIZATION, "personalization=local-head"],
}
TABLES = {"feedback": FEEDBACK_RUNS, "personalization": PERSONALIZATION_RUNS}


def run(results_dir: Path, name: str, items: list[str]) -> dict[str, Any]:
    """Run one configuration unless it already completed; return its summary."""
    summary_path = results_dir / name / "summary.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("status") == "completed":
        print(f"{name}: already completed, kept", flush=True)
    else:
        if (results_dir / name).exists():  # an interrupted attempt: start it again under its name
            (results_dir / name).rename(
                results_dir / f"{name}.interrupted-{len(list(results_dir.glob(name + '.interrupted-*')))}"
            )
        command = [sys.executable, "-m", "flhf_core.runs.cli", "run", *items, "--quiet"]
        command += [f"results-dir={results_dir}", f"run-name={name}"]
        print(f"{name}: {' '.join(command[3:])}", flush=True)
        subprocess.run(command, check=True)
    return json.loads(summary_path.read_text())


def last_round_users(run_dir: Path) -> dict[int, dict[str, float]]:
    """Each user's figures in the last round (its client row)."""
    rows = [
        r for r in read_metrics(run_dir / "metrics.jsonl") if r["scope"] == "client" and not r.get("failed")
    ]
    last = max(r["round"] for r in rows)
    return {r["client"]: r for r in rows if r["round"] == last}


def feedback_table(results_dir: Path, summaries: dict[str, dict]) -> tuple[str, dict]:
    header = (
        "| run | reward after SFT | after feedback | change | worst user after SFT | worst after "
        "| win rate vs round 0 | held-out ROUGE-L | seconds |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines, figures = [], {}
    for name, s in summaries.items():
        before, after = s["reward-after-sft"], s["reward"]
        figures[name] = {
            k: s.get(k)
            for k in (
                "reward-after-sft",
                "reward",
                "reward-worst-after-sft",
                "reward-worst",
                "win-rate",
                "rougeL",
                "seconds",
            )
        }
        lines.append(
            f"| {name} | {before:.4f} | {after:.4f} | {100 * (after / before - 1):+.0f}% "
            f"| {s['reward-worst-after-sft']:.4f} | {s['reward-worst']:.4f} | {s['win-rate']:.3f} "
            f"| {s['rougeL']:.2f} | {s['seconds']:.0f} |"
        )
    return header + "\n".join(lines), figures


def personalization_table(results_dir: Path, summaries: dict[str, dict]) -> tuple[str, dict]:
    users = {name: last_round_users(results_dir / name) for name in summaries}
    columns = [
        ("`none` global", "none", "reward"),
        ("`lora` global", "lora", "reward"),
        ("`lora` personalized", "lora", "reward-personal"),
        ("`local-head` personalized", "local-head", "reward-personal"),
    ]
    header = "| user | " + " | ".join(c[0] for c in columns) + " |\n" + "|---" * (len(columns) + 1) + "|\n"
    lines, figures = [], {}
    for user in sorted(users["none"]):
        cells = [f"{users[run][user].get(key, float('nan')):.3f}" for _, run, key in columns]
        lines.append(f"| {user} | " + " | ".join(cells) + " |")
    means = []
    for label, run, key in columns:
        values = [u[key] for u in users[run].values() if key in u]
        means.append(f"**{sum(values) / len(values):.3f} ({min(values):.3f})**")
        figures[label] = {"mean": sum(values) / len(values), "worst": min(values), "users": values}
    lines.append("| mean (worst) | " + " | ".join(means) + " |")
    figures["lora-users-helped"] = summaries["lora"].get("users-helped")
    figures["bytes-per-round"] = {
        name: (s["bytes-up"] + s["bytes-down"]) / max(s["rounds"], 1) for name, s in summaries.items()
    }
    return header + "\n".join(lines), figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("--results-dir", default="results/bench")
    args = parser.parse_args()
    results_dir = Path(args.results_dir).resolve() / args.table
    results_dir.mkdir(parents=True, exist_ok=True)
    summaries = {name: run(results_dir, name, items) for name, items in TABLES[args.table].items()}
    build = feedback_table if args.table == "feedback" else personalization_table
    table, figures = build(results_dir, summaries)
    atomic_write_json(results_dir.parent / f"{args.table}.json", {"table": args.table, "figures": figures})
    print(f"\n{table}")


if __name__ == "__main__":
    main()
