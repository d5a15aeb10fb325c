"""Rows of the personalize matrix against a reference, paired by seed and user.

    python bench/paired.py fedavg-sft                          # every row against fedavg-sft
    python bench/paired.py local-only soft-prompt/reinforce lora
    python bench/paired.py fedavg-sft --key content            # a factor instead of the reward

Rows of one seed share everything up to where they differ (the supervised model, documents and
users), so the figure to judge is the difference on the same (seed, user): its mean, the 95%
bootstrap interval over seeds and users (:mod:`flhf_core.results.statistics`), the interval's
half-width (the smallest difference these seeds and users can detect), the ratio of the means,
and the verdict: a row *beats* the reference only when the interval lies above zero. Reads the
committed evidence of ``bench/personalize.py`` (``bench/results/personalize-runs/``), so it
needs no run.
"""

from __future__ import annotations

import argparse

from personalize import SEEDS, load_evidence
from personalize_figures import Methods, against, common_seeds, pair


def comparisons(methods: Methods, reference: str, rows: list[str], key: str = "reward") -> list[dict]:
    """Each of ``rows`` against ``reference`` on the seeds and users both have."""
    found = []
    for row in rows:
        seeds = common_seeds(methods, row, reference)
        if row == reference or not seeds:
            continue
        mine, theirs = pair(methods, row, reference, seeds, key)
        figures = against(mine, theirs)
        verdict = (
            "beats it" if figures["low"] > 0 else "behind it" if figures["high"] < 0 else "no difference"
        )
        found.append({"row": row, "seeds": seeds, "users": mine.shape[1], **figures, "verdict": verdict})
    return found


def markdown(reference: str, found: list[dict], key: str) -> str:
    lines = [
        f"{key} minus `{reference}`'s on the same (seed, user); 95% bootstrap interval over seeds and users:",
        "",
        "| row | seeds | users | difference | 95% interval | detectable (half-width) | ratio | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in found:
        ratio = "–" if f["ratio"] is None else f"{f['ratio']:.2f}x"
        lines.append(
            f"| `{f['row']}` | {len(f['seeds'])} | {f['users']} | {f['mean']:+.4f} | "
            f"[{f['low']:+.4f}, {f['high']:+.4f}] | {f['half-width']:.4f} | {ratio} | {f['verdict']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", help="the method every row is judged against, e.g. fedavg-sft")
    parser.add_argument("rows", nargs="*", help="the rows to judge (default: every method in the evidence)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--key", default="reward", choices=["reward", "content", "length"])
    args = parser.parse_args()
    methods, _ = load_evidence(args.seeds)
    if args.reference not in methods:
        parser.error(
            f"no evidence of {args.reference!r}; the evidence holds: {', '.join(sorted(methods)) or 'nothing'}"
        )
    unknown = [row for row in args.rows if row not in methods]
    if unknown:
        parser.error(f"no evidence of {', '.join(unknown)}; the evidence holds: {', '.join(sorted(methods))}")
    print(
        markdown(
            args.reference,
            comparisons(methods, args.reference, args.rows or sorted(methods), args.key),
            args.key,
        )
    )


if __name__ == "__main__":
    main()
