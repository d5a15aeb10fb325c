"""Wall time per round: Flower's simulation engine vs the loopback deployment (separate processes).

    python bench/round_time.py [PRESET] [--users N] [key=value ...]

Runs the preset (default: smoke) once with ``flhf run`` and once with ``flhf loopback``,
one after the other (never side by side: on a small machine they would slow each other
down), then prints each round's seconds from the server rows of ``metrics.jsonl`` and the
whole command's wall time. Results go to a temporary folder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flhf_core.tracking import read_metrics


def timed_run(
    mode: str, preset: str, users: int, overrides: list[str], results: Path
) -> tuple[float, list[float]]:
    command = [sys.executable, "-m", "flhf_core.cli", mode, preset, "--quiet", f"--users={users}"]
    command += [f"results-dir={results}", f"run-name={mode}", *overrides]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    rows = read_metrics(results / mode / "metrics.jsonl")
    return wall, [r["seconds"] for r in rows if r["scope"] == "server" and r["round"] > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", nargs="?", default="smoke")
    parser.add_argument("--users", type=int, default=2)
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as folder:
        figures = {
            mode: timed_run(mode, args.preset, args.users, overrides, Path(folder))
            for mode in ("run", "loopback")
        }
    print(f"\n{args.preset}, {args.users} users: seconds per round (server rows) and whole command")
    for mode, (wall, rounds) in figures.items():
        engine = "simulation" if mode == "run" else "loopback deployment"
        per_round = ", ".join(f"{s:.1f}" for s in rounds)
        print(
            f"  {engine:20} rounds [{per_round}] mean {sum(rounds) / len(rounds):.1f} s | wall {wall:.0f} s"
        )


if __name__ == "__main__":
    main()
