"""Seconds per round: Flower's simulation engine against the loopback deployment (separate processes).

    python bench/round_time.py [PRESET] [--users N] [--before COMMIT] [key=value ...]

Runs the preset (default: smoke) once with ``flhf run`` and once with ``flhf loopback``,
one after the other (never side by side: on a small machine they would slow each other
down), then prints each round's seconds (server rows of ``metrics.jsonl``), the whole
command's wall time, and the deployment's rounds against the simulation's (target: at most
4x). Writes ``bench/results/round_time.json``. ``--before COMMIT`` measures that commit instead
(from a temporary ``git worktree``) and writes ``round_time-before.json``.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from common import PROJECT_DIR, mean, run_flhf, server_rows, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", nargs="?", default="smoke")
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--before", help="measure this commit instead of the checkout")
    args, overrides = parser.parse_known_args()
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        checkout = PROJECT_DIR
        if args.before:
            checkout = Path(folder) / "before"
            command = ["git", "worktree", "add", "--detach", str(checkout), args.before]
            subprocess.run(command, cwd=PROJECT_DIR, check=True)
        try:
            for mode in ("run", "loopback"):
                items, extra = [args.preset, *overrides], [f"--users={args.users}"]
                wall, rows = run_flhf(mode, items, Path(folder), mode, extra, cwd=checkout)
                seconds = [r["seconds"] for r in server_rows(rows)]
                figures["simulation" if mode == "run" else "loopback"] = {
                    "round-seconds": seconds,
                    "mean-round-seconds": mean(seconds),
                    "wall-seconds": wall,
                }
        finally:
            if args.before:
                subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=PROJECT_DIR)
    ratio = figures["loopback"]["mean-round-seconds"] / figures["simulation"]["mean-round-seconds"]
    print(f"\n{args.preset}, {args.users} users: seconds per round (server rows) and whole command")
    for engine, r in figures.items():
        per_round = ", ".join(f"{s:.1f}" for s in r["round-seconds"])
        print(
            f"  {engine:11} rounds [{per_round}] mean {r['mean-round-seconds']:.1f} s | wall {r['wall-seconds']:.0f} s"
        )
    print(f"  loopback / simulation: {ratio:.1f}x per round (target <= 4x)")
    name, measured = (
        ("round_time-before", {"measured-commit": args.before}) if args.before else ("round_time", {})
    )
    write_result(
        name,
        {"preset": args.preset, "users": args.users, **measured, **figures, "loopback-vs-simulation": ratio},
    )


if __name__ == "__main__":
    main()
