"""Runs side by side: ``flhf compare RUN_DIR...``.

Reads each run's ``config.json``, ``summary.json`` and ``metrics.jsonl`` and writes
``comparison.md`` (a Markdown table of the final figures: mean and worst-user reward, win rate,
ROUGE-L, bytes, seconds) and ``comparison.png`` (the runs' reward curves on one plot). When the
runs differ only in ``seed``, the table gives each figure as mean ± standard deviation over
them: what a researcher pastes into a paper or an issue.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flhf_core.common import atomic_write_text, read_json
from flhf_core.config import ConfigError
from flhf_core.results.tracking import read_metrics

# (summary key, column title, format)
FIGURES = (
    ("reward", "reward", "{:.3f}"),
    ("reward-worst", "worst user", "{:.3f}"),
    ("win-rate", "win rate", "{:.2f}"),
    ("rougeL", "ROUGE-L", "{:.2f}"),
    ("bytes", "bytes", "{:.3g}"),
    ("seconds", "seconds", "{:.0f}"),
)
# keys that may differ between seeds of one configuration: where a run is, how it was tracked
# and checkpointed, whether it was resumed
NOT_THE_EXPERIMENT = (
    "seed",
    "run-name",
    "results-dir",
    "resume",
    "checkpoint-every",
    "tracking",
    "mlflow-tracking-uri",
    "round-timeout",
)


@dataclass(frozen=True)
class Run:
    name: str
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]

    def figure(self, key: str) -> float | None:
        if key == "bytes":
            return float(self.summary.get("bytes-up", 0) + self.summary.get("bytes-down", 0))
        value = self.summary.get(key)
        return float(value) if isinstance(value, int | float) else None

    def reward_curve(self) -> list[tuple[int, float]]:
        return [(r["round"], r["reward"]) for r in self.rows if r["scope"] == "server" and "reward" in r]


def load_run(run_dir: Path) -> Run:
    """A finished (or failed) run's folder; a clear error if it is not one."""
    missing = [f for f in ("config.json", "summary.json", "metrics.jsonl") if not (run_dir / f).is_file()]
    if missing:
        raise ConfigError(f"{run_dir} is not a finished FLHF run: {', '.join(missing)} missing.")
    return Run(
        run_dir.name,
        read_json(run_dir / "config.json"),
        read_json(run_dir / "summary.json"),
        read_metrics(run_dir / "metrics.jsonl"),
    )


def differ_only_in_seed(runs: Sequence[Run]) -> bool:
    def experiment(run: Run) -> dict[str, Any]:
        return {k: v for k, v in run.config.items() if k not in NOT_THE_EXPERIMENT}

    return len(runs) > 1 and all(experiment(r) == experiment(runs[0]) for r in runs[1:])


def cell(values: Sequence[float | None], form: str) -> str:
    """One figure, or mean ± standard deviation of several; "–" where a run has none."""
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    if len(values) == 1:
        return form.format(present[0])
    spread = statistics.stdev(present) if len(present) > 1 else 0.0
    return f"{form.format(statistics.fmean(present))} ± {form.format(spread)}"


def markdown_table(runs: Sequence[Run]) -> str:
    """The final figures, one row per run, or one row of mean ± std when only the seed differs."""
    header = "| run | " + " | ".join(title for _, title, _ in FIGURES) + " |"
    lines = [header, "|" + " --- |" * (len(FIGURES) + 1)]
    if differ_only_in_seed(runs):
        seeds = ", ".join(str(r.config.get("seed")) for r in runs)
        figures = [cell([r.figure(key) for r in runs], form) for key, _, form in FIGURES]
        lines.append(f"| {len(runs)} seeds ({seeds}) | " + " | ".join(figures) + " |")
    else:
        for run in runs:
            lines.append(
                f"| {run.name} | " + " | ".join(cell([run.figure(k)], f) for k, _, f in FIGURES) + " |"
            )
    return "\n".join(lines) + "\n"


def plot_rewards(runs: Sequence[Run], path: Path) -> None:
    """The users' mean reward per round of every run, on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        curve = run.reward_curve()
        if curve:
            xs, ys = zip(*curve, strict=True)
            ax.plot(xs, ys, marker="o", label=f"{run.name} (seed {run.config.get('seed')})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("users' mean reward (held-out documents)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def compare(run_dirs: Sequence[Path], out_dir: Path) -> tuple[Path, Path]:
    """Write ``comparison.md`` and ``comparison.png`` for the runs into ``out_dir``."""
    runs = [load_run(Path(d)) for d in run_dirs]
    if not runs:
        raise ConfigError("compare: give at least one run folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    table, plot = out_dir / "comparison.md", out_dir / "comparison.png"
    atomic_write_text(table, markdown_table(runs))
    plot_rewards(runs, plot)
    return table, plot
