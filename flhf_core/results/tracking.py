"""The results directory of one run, written so that nothing is ever half-written.

``<results-dir>/<run-name>/`` holds ``config.json``, ``metrics.jsonl`` (one
JSON object a line, flushed and fsynced per line), ``summary.json``,
``tensorboard/``, ``plots/`` and ``checkpoints/``. JSON files are written to a
temporary file and renamed; model folders are saved to a temporary folder and
renamed, so a crash leaves the previous version, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from flhf_core.common import atomic_write_json, jsonable

CLAIM = ".claimed"  # a run folder a launcher created for its run, not yet written to


def claim_run_dir(results_dir: Path, run_name: str) -> Path:
    """Create the run's folder for a launcher, before the run starts: ``run_name``, or
    ``run_name-2``, ... if taken (an atomic ``mkdir``: two launchers started in the same second
    never share one). The ServerApp then writes into it (:func:`new_run_dir`)."""
    folder = _unique_dir(results_dir, run_name)
    (folder / CLAIM).touch()
    return folder


def new_run_dir(results_dir: Path, run_name: str) -> Path:
    """Create ``results_dir/run_name`` (a timestamped name if empty; never reuses one), or take
    over the folder a launcher claimed for this run (:func:`claim_run_dir`)."""
    name = run_name or time.strftime("run-%Y%m%d-%H%M%S")
    claimed = results_dir / name / CLAIM
    if claimed.is_file():
        with contextlib.suppress(FileNotFoundError):  # a second taker finds it gone: a new folder
            claimed.unlink()
            return results_dir / name
    return _unique_dir(results_dir, name)


def _unique_dir(results_dir: Path, name: str) -> Path:
    """``results_dir/name``, or ``name-2``, ``name-3``...: the first that ``mkdir`` can create."""
    name = name or time.strftime("run-%Y%m%d-%H%M%S")
    results_dir.mkdir(parents=True, exist_ok=True)
    candidate, suffix = results_dir / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = results_dir / f"{name}-{suffix}"


class Sink(Protocol):
    """A tracking backend beside the files (MLflow): what :class:`Tracker` forwards to it."""

    def log_row(self, row: Mapping[str, Any]) -> None: ...

    def finish(self, run_dir: Path, status: str) -> None: ...

    def close(self) -> None: ...


class Tracker:
    """Appends metric rows to ``metrics.jsonl``, TensorBoard and the other sinks; writes the rest.

    ``first_round``: the round of the first row this tracker will write (0 for a new run; the
    round after the checkpoint's last row for a resumed one). TensorBoard then drops its events
    from that round on, which the killed run may have written after its checkpoint.

    A sink that fails is reported once and dropped: the files are the record, and a run is
    never lost to its tracking backend.
    """

    def __init__(
        self,
        run_dir: Path,
        config: Mapping[str, Any],
        trackers: Iterable[str] = ("tensorboard",),
        first_round: int = 0,
    ) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        trackers = tuple(trackers)
        atomic_write_json(run_dir / "config.json", dict(config))
        self._metrics_file = self.metrics_path.open("a")
        self._writer = None
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_round or None)
        self.sinks: dict[str, Sink] = {}
        if "mlflow" in trackers:
            self._guarded("mlflow", lambda: self._add_mlflow(config, first_round))

    def _add_mlflow(self, config: Mapping[str, Any], first_round: int) -> None:
        from flhf_core.results.mlflow_sink import MlflowSink

        self.sinks["mlflow"] = MlflowSink(self.run_dir, config, resumed=first_round > 0)

    def _guarded(self, name: str, call: Callable[[], object]) -> None:
        """Run a sink's call; on failure report it once and stop using that sink."""
        try:
            call()
        except Exception as error:
            sink = self.sinks.pop(name, None)
            with contextlib.suppress(Exception):  # let it mark its run failed, if it still can
                if sink is not None:
                    sink.close()
            logging.getLogger("flwr").warning(
                "tracking: %s failed (%s: %s); it is switched off for this run, the files go on",
                name,
                type(error).__name__,
                error,
            )

    def log(
        self, round_: int, phase: str, scope: str, client: int | None, metrics: Mapping[str, float]
    ) -> dict:
        """One row: ``round``, ``phase``, ``scope``, ``client``, then the metrics."""
        row = {"round": round_, "phase": phase, "scope": scope, "client": client, **metrics}
        self._metrics_file.write(json.dumps(jsonable(row)) + "\n")
        self._metrics_file.flush()
        os.fsync(self._metrics_file.fileno())
        if self._writer is not None:  # one TensorBoard: the federation's curves and each user's
            tag = scope if client is None else f"user-{client}"
            for key, value in metrics.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._writer.add_scalar(f"{tag}/{key}", value, round_)
        for name, sink in list(self.sinks.items()):
            self._guarded(name, lambda sink=sink: sink.log_row(row))
        return row

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.run_dir / "summary.json", dict(summary))

    def finish(self, status: str) -> None:
        """The run's end (summary, plots and model are written): the sinks take their artifacts."""
        for name, sink in list(self.sinks.items()):
            self._guarded(name, lambda sink=sink: sink.finish(self.run_dir, status))

    def close(self) -> None:
        self._metrics_file.close()
        if self._writer is not None:
            self._writer.close()
        for name, sink in list(self.sinks.items()):
            self._guarded(name, sink.close)


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file."""
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def read_user_rewards(path: Path) -> dict[int, tuple[float, tuple[str, ...] | None]]:
    """Each user's reward in a ``judgements.json`` and the documents it was judged on: the mean
    true utility of the summaries its model wrote on its held-out documents (its personalized
    model's, where it has one), and their ids (None for a user with its own data file)."""
    users = json.loads(path.read_text())["users"]
    rewards = {}
    for user, values in users.items():
        utilities = values.get("judged-utility-personal") or values["judged-utility"]
        documents = values.get("doc-ids")
        rewards[int(user)] = (
            sum(utilities) / len(utilities),
            tuple(documents) if documents is not None else None,
        )
    return rewards


def plot_metrics(
    rows: Iterable[Mapping[str, Any]],
    out_dir: Path,
    keys: Iterable[str],
    references: Mapping[str, Mapping[str, float]] | None = None,
) -> list[Path]:
    """One PNG per metric: the server's figure per round, and each user's.

    ``references[key]``: named constants drawn as horizontal lines on ``key``'s plot (the
    extractive baselines on ROUGE: does the model beat copying the first words?).
    """
    references = references or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = list(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys:
        series: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            value = row.get(key)
            if isinstance(value, int | float):
                label = "federation" if row["client"] is None else f"user {row['client']}"
                series.setdefault(label, []).append((row["round"], value))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in sorted(series.items(), key=lambda kv: (kv[0] != "federation", kv[0])):
            xs, ys = zip(*sorted(points), strict=True)
            style = dict(linewidth=2.5, color="black") if label == "federation" else dict(alpha=0.6)
            ax.plot(xs, ys, marker="o", label=label, **style)
        for (name, value), style in zip(references.get(key, {}).items(), ("--", ":", "-."), strict=False):
            ax.axhline(value, linestyle=style, color="gray", label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written
