"""The default federation, before and after: ``flhf run`` with pyproject's defaults (2 users,
tiny-t5 ``s``, 8 rounds), on this checkout and on an earlier commit, one after the other.

    python bench/default_run.py [--before COMMIT] [--skip-before]

Prints and writes (``bench/results/default_run.json``) each run's wall time, seconds per round,
where the users' time went (local update, evaluation, setup; summed over users), and the final
held-out ROUGE-L. The earlier commit runs from a temporary ``git worktree`` with this
environment. Never run it beside other work: two torch processes on 2 cores slow each other.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from common import PROJECT_DIR, mean, run_flhf, server_rows, write_result

BEFORE = "d8e8817"  # the last commit before issue 10 (fast rounds)


def figures(wall: float, rows: list[dict]) -> dict:
    server = server_rows(rows)
    final = server[-1]
    out = {
        "wall-seconds": wall,
        "round-seconds": [r["seconds"] for r in server],
        "mean-round-seconds": mean([r["seconds"] for r in server]),
        "rounds-seconds": sum(r["seconds"] for r in server),
        "rougeL": final.get("rougeL"),
        "reward": final.get("reward"),
    }
    if "client-train-seconds" in final:
        train = sum(r["client-train-seconds"] for r in server)
        evaluation = sum(r["client-eval-seconds"] for r in server)
        setup = sum(r["setup-seconds"] for r in server)
        out.update(
            {
                "client-train-seconds": train,
                "client-eval-seconds": evaluation,
                "setup-seconds": setup,
                "server-eval-seconds": sum(r.get("server-eval-seconds", 0.0) for r in server),
                "update-share": train / (train + evaluation + setup),
            }
        )
    else:  # before issue 10: the users' local update only (train-seconds, averaged per round)
        users = [r for r in rows if r["scope"] == "client" and "train-seconds" in r]
        out["client-train-seconds"] = sum(r["train-seconds"] for r in users)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE, help=f"the commit to compare with (default {BEFORE})")
    parser.add_argument("--skip-before", action="store_true", help="run this checkout only")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="flhf-bench-") as folder:
        folder = Path(folder)
        defaults = folder / "pyproject-defaults.toml"
        defaults.write_text("# nothing: pyproject's defaults\n")
        runs = [("after", PROJECT_DIR)]
        if not args.skip_before:
            worktree = folder / "before"
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(worktree), args.before],
                cwd=PROJECT_DIR,
                check=True,
            )
            runs.insert(0, ("before", worktree))
        try:
            for label, checkout in runs:
                print(f"== {label}: {checkout}", flush=True)
                wall, rows = run_flhf(
                    "run", [str(defaults), "--users=2"], folder / "results", label, cwd=checkout
                )
                results[label] = figures(wall, rows)
        finally:
            if not args.skip_before:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(folder / "before")], cwd=PROJECT_DIR
                )
    print(
        "\npyproject defaults (2 users, tiny-t5 s, 8 rounds): wall, mean round, local-update share, ROUGE-L"
    )
    for label, r in results.items():
        share = f"{r['update-share']:.0%}" if "update-share" in r else "n/a"
        print(
            f"  {label:7} wall {r['wall-seconds']:6.1f} s | rounds {r['rounds-seconds']:6.1f} s "
            f"(mean {r['mean-round-seconds']:.1f} s) | update share {share} | rougeL {r['rougeL']:.2f}"
        )
    if "before" in results:
        speedup = results["before"]["wall-seconds"] / results["after"]["wall-seconds"]
        print(f"  speed-up of the whole run: {speedup:.2f}x")
        results["speedup-wall"] = speedup
        results["before-commit"] = args.before
    write_result("default_run", results)


if __name__ == "__main__":
    main()
