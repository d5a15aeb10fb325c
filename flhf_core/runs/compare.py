"""Runs side by side: ``flhf compare RUN_DIR...``.

Reads each run's ``config.json``, ``summary.json`` and ``metrics.jsonl`` and writes
``comparison.md`` (a Markdown table of the final figures: mean and worst-user reward, win rate,
ROUGE-L, bytes, seconds) and ``comparison.png`` (the runs' reward curves on one plot). Runs
whose configs differ only in where and how they were run (:data:`NOT_THE_EXPERIMENT`: the
seed, run name, results folder, resume, tracking) are one method over seeds: one row, each
figure as mean ± standard deviation over them. A failed or unfinished run is listed apart,
with why, and never averaged in.

Under the table, each method against the first one (the reference) as paired differences of
the users' rewards on the same (seed, user) (``judgements.json``: each user's held-out
documents), with the 95% bootstrap interval of :mod:`flhf_core.results.statistics`: a method
*beats* the reference only when its interval lies above zero, and the interval's half-width
is the smallest difference those seeds and users can detect.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flhf_core.common import atomic_write_text, read_json
from flhf_core.config import ConfigError
from flhf_core.results.statistics import paired_interval
from flhf_core.results.tracking import read_metrics, read_user_rewards

# (summary key, column title, format)
FIGURES = (
    ("reward", "reward", "{:.3f}"),
    ("reward-worst", "worst user", "{:.3f}"),
    ("win-rate", "win rate", "{:.2f}"),
    ("rougeL", "ROUGE-L", "{:.2f}"),
    ("bytes", "bytes", "{:.3g}"),
    ("seconds", "seconds", "{:.0f}"),
)
# keys that may differ between seeds of one method: where a run is, how it was tracked and
# checkpointed (checkpoints change no figure), whether it was resumed
NOT_THE_EXPERIMENT = (
    "seed",
    "run-name",
    "results-dir",
    "resume",
    "checkpoint-every",
    "tracking",
    "mlflow-tracking-uri",
)


@dataclass(frozen=True)
class Run:
    name: str
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    # judgements.json's: user -> (reward on its held-out documents, their ids)
    user_rewards: dict[int, tuple[float, tuple[str, ...] | None]]

    @property
    def status(self) -> str:
        """``completed``, ``failed``, or ``incomplete`` (no summary yet: running, or killed)."""
        return str(self.summary.get("status", "incomplete"))

    @property
    def experiment(self) -> tuple:
        """What the run measured: its config without :data:`NOT_THE_EXPERIMENT`."""
        return tuple(sorted((k, repr(v)) for k, v in self.config.items() if k not in NOT_THE_EXPERIMENT))

    def figure(self, key: str) -> float | None:
        if key == "bytes":
            return float(self.summary.get("bytes-up", 0) + self.summary.get("bytes-down", 0))
        value = self.summary.get(key)
        return float(value) if isinstance(value, int | float) else None

    def reward_curve(self) -> list[tuple[int, float]]:
        return [(r["round"], r["reward"]) for r in self.rows if r["scope"] == "server" and "reward" in r]


def load_run(run_dir: Path) -> Run:
    """A run's folder, finished or not (an unfinished one has no summary); a clear error if it
    is no FLHF run folder."""
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not an FLHF run folder: config.json missing.")
    summary = run_dir / "summary.json"
    metrics = run_dir / "metrics.jsonl"
    judgements = run_dir / "judgements.json"
    return Run(
        run_dir.name,
        read_json(run_dir / "config.json"),
        read_json(summary) if summary.is_file() else {},
        read_metrics(metrics) if metrics.is_file() else [],
        read_user_rewards(judgements) if judgements.is_file() else {},
    )


def methods(runs: Sequence[Run]) -> list[list[Run]]:
    """The completed runs grouped by experiment (a method over seeds), in the order given."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.status == "completed":
            groups.setdefault(run.experiment, []).append(run)
    return list(groups.values())


def cell(values: Sequence[float | None], form: str) -> str:
    """One figure, or mean ± standard deviation of several; "–" where a run has none."""
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    if len(values) == 1:
        return form.format(present[0])
    spread = statistics.stdev(present) if len(present) > 1 else 0.0
    return f"{form.format(statistics.fmean(present))} ± {form.format(spread)}"


def method_name(group: Sequence[Run]) -> str:
    if len(group) == 1:
        return group[0].name
    return f"{group[0].name}: {len(group)} seeds ({', '.join(str(r.config.get('seed')) for r in group)})"


def by_seed(group: Sequence[Run]) -> dict[Any, dict[int, tuple[float, tuple[str, ...] | None]]]:
    """Each seed's user rewards (the first run of a seed, where a method ran one seed twice)."""
    found: dict[Any, dict[int, tuple[float, tuple[str, ...] | None]]] = {}
    for run in group:
        if run.user_rewards:
            found.setdefault(run.config.get("seed"), run.user_rewards)
    return found


def paired_rewards(group: Sequence[Run], reference: Sequence[Run]) -> tuple[np.ndarray, np.ndarray] | None:
    """(seeds x users) rewards of ``group`` and ``reference`` on the seeds and users both have,
    a user counted only where both runs judged it on the same documents; None when none is left."""
    mine, theirs = by_seed(group), by_seed(reference)
    seeds = sorted(mine.keys() & theirs.keys(), key=str)
    same = [{u for u in mine[s].keys() & theirs[s].keys() if mine[s][u][1] == theirs[s][u][1]} for s in seeds]
    users = sorted(set.intersection(*same)) if same else []
    if not users:
        return None
    return (
        np.array([[mine[s][u][0] for u in users] for s in seeds]),
        np.array([[theirs[s][u][0] for u in users] for s in seeds]),
    )


def paired_lines(runs: Sequence[Run]) -> list[str]:
    """Each method against the first: the paired difference of the users' rewards, its 95%
    interval, the ratio of the means and the verdict (beats only when the interval is above 0)."""
    groups = methods(runs)
    if len(groups) < 2:
        return []
    reference = groups[0]
    lines = [
        "",
        f"Against `{method_name(reference)}`: the users' reward (their personalized model's, where "
        "they have one) minus theirs on the same seed, user and documents; 95% bootstrap interval "
        "over seeds and users:",
        "",
        "| run | seeds x users | difference | 95% interval | detectable (half-width) | ratio | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for group in groups[1:]:
        pair = paired_rewards(group, reference)
        if pair is None:
            lines.append(f"| {method_name(group)} | 0 | – | – | – | – | no shared seed with user rewards |")
            continue
        mine, theirs = pair
        interval = paired_interval(mine - theirs)
        verdict = "beats it" if interval.low > 0 else "behind it" if interval.high < 0 else "no difference"
        lines.append(
            f"| {method_name(group)} | {mine.shape[0]} x {mine.shape[1]} | {interval.mean:+.4f} | "
            f"[{interval.low:+.4f}, {interval.high:+.4f}] | {interval.half_width:.4f} | "
            f"{f'{mine.mean() / theirs.mean():.2f}x' if theirs.mean() > 0 else '–'} | {verdict} |"
        )
    return lines


def markdown_table(runs: Sequence[Run]) -> str:
    """The final figures, one row per method (mean ± std over its seeds), then the runs left out."""
    header = "| run | " + " | ".join(title for _, title, _ in FIGURES) + " |"
    lines = [header, "|" + " --- |" * (len(FIGURES) + 1)]
    for group in methods(runs):
        figures = [cell([r.figure(key) for r in group], form) for key, _, form in FIGURES]
        lines.append(f"| {method_name(group)} | " + " | ".join(figures) + " |")
    lines += paired_lines(runs)
    left_out = [run for run in runs if run.status != "completed"]
    if left_out:
        lines += ["", "Not compared (never averaged in):", ""]
        for run in left_out:
            why = run.summary.get("error") or (
                "no summary.json: still running, or stopped" if not run.summary else ""
            )
            lines.append(f"- {run.name}: {run.status}" + (f": {why}" if why else ""))
    return "\n".join(lines) + "\n"


def plot_rewards(runs: Sequence[Run], path: Path) -> None:
    """The users' mean reward per round of every run, on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in [run for group in methods(runs) for run in group]:
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
