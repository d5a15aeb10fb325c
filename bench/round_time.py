"""Seconds per round: Flower's simulation engine against the loopback deployment (separate processes).

    python bench/round_time.py [PRESET] [--users N] [key=value ...]

Runs the preset (default: smoke) once with ``flhf run`` and once with ``flhf loopback``,
one after the other (never side by side: on a small machine they would slow each other
down), then prints each round's seconds (server rows of ``metrics.jsonl``), the whole
command's wall time, and the deployment's rounds against the simulation's (target: at most
4x). Writes ``bench/results/round_time.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import mean, run_flhf, server_rows, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", nargs="?", default="smoke")
    parser.add_argument("--users", type=int, default=2)
    args, overrides = parser.parse_known_args()
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("run", "loopback"):
            wall, rows = run_flhf(
                mode, [args.preset, *overrides], Path(folder), mode, [f"--users={args.users}"]
            )
            seconds = [r["seconds"] for r in server_rows(rows)]
            figures["simulation" if mode == "run" else "loopback"] = {
                "round-seconds": seconds,
                "mean-round-seconds": mean(seconds),
                "wall-seconds": wall,
            }
    ratio = figures["loopback"]["mean-round-seconds"] / figures["simulation"]["mean-round-seconds"]
    print(f"\n{args.preset}, {args.users} users: seconds per round (server rows) and whole command")
    for engine, r in figures.items():
        per_round = ", ".join(f"{s:.1f}" for s in r["round-seconds"])
        print(
            f"  {engine:11} rounds [{per_round}] mean {r['mean-round-seconds']:.1f} s | wall {r['wall-seconds']:.0f} s"
        )
    print(f"  loopback / simulation: {ratio:.1f}x per round (target <= 4x)")
    write_result(
        "round_time", {"preset": args.preset, "users": args.users, **figures, "loopback-vs-simulation": ratio}
    )


if __name__ == "__main__":
    main()
