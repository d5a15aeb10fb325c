"""bench/quality.py's table in Markdown: every row, and the reward-model rows (issue 13) with
their models' figures. Each cell is ``mean ± std over seeds`` (see :func:`cell`)."""

from __future__ import annotations

from typing import Any

from quality_figures import BASELINE, GATE


def markdown_reward_models(table: dict[str, dict[str, Any]]) -> str:
    """The reward-model rows (issue 13): reward against the budget, and how the learned reward
    models did in the last feedback round (on the samples they scored)."""
    lines = [
        "| method | reward | worst user | win rate vs fedavg-sft | judgements per user and round "
        "| RM accuracy | RM correlation | RM gap | RM held-out accuracy | RM used | MB per round | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, e in table.items():
        if "ratings-used" not in e or ("+" not in method and "@" not in method):
            continue
        lines.append(
            f"| `{method}` | {cell(e, 'reward', 4)} | {cell(e, 'reward-worst', 4)} | {cell(e, 'win-rate', 3)} "
            f"| {e['ratings-used']:.1f} | {cell(e, 'reward-model-accuracy', 3)} "
            f"| {cell(e, 'reward-model-correlation', 3)} | {cell(e, 'reward-model-gap', 3)} "
            f"| {cell(e, 'reward-model-heldout-accuracy', 3)} | {cell(e, GATE, 2)} "
            f"| {e['bytes'] / 1e6:.1f} | {e['seeds']} |"
        )
    return "\n".join(lines)


def cell(entry: dict[str, Any], key: str, digits: int) -> str:
    """``mean ± std over seeds`` of ``key`` (the number of seeds when it is not every seed's,
    as a wall time measured beside other work is left out), or a dash."""
    if key not in entry:
        return "–"
    counted = entry.get(f"{key}-seeds", entry["seeds"])
    if counted == 1 and entry["seeds"] > 1:
        return f"{entry[key]:.{digits}f} (1 seed)"
    spread = f"{entry[key]:.{digits}f} ± {entry.get(f'{key}-over-seeds', 0.0):.{digits}f}"
    return spread if counted == entry["seeds"] else f"{spread} ({counted} seeds)"


def markdown(table: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | reward | worst user | std across users | win rate vs fedavg-sft | ROUGE-L (user's aspect) "
        "| MB per round | wall time (s) | beats fedavg-sft | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, e in table.items():
        megabytes = f"{e['bytes'] / 1e6:.1f}" if "bytes" in e else "–"
        beats = "–" if method == BASELINE else f"{e['beats-fedavg-sft']}/{e['paired-seeds']}"
        lines.append(
            f"| `{method}` | {cell(e, 'reward', 4)} | {cell(e, 'reward-worst', 4)} | {cell(e, 'reward-std', 4)} "
            f"| {cell(e, 'win-rate', 3)} | {cell(e, 'rougeL', 2)} | {megabytes} | {cell(e, 'seconds', 0)} "
            f"| {beats} | {e['seeds']} |"
        )
    return "\n".join(lines)
