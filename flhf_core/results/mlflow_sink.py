"""MLflow tracking: a run's config, metrics and results, beside its files.

``tracking = "mlflow"`` (or ``tensorboard,mlflow``) makes :class:`flhf_core.results.tracking.Tracker`
forward every metrics row to :class:`MlflowSink`. The files stay the record; MLflow is a view
of them that can compare runs side by side. What goes where:

- params: every run-config key (the resolved config, as ``config.json`` has it);
- metrics: the server's rows under their own names (``rougeL``, ``reward``, ...), each user's
  as ``user-<k>/<metric>`` (MLflow allows ``/`` in names; its UI groups on it), step = round;
- artifacts, at the end: ``summary.json``, ``plots/`` and the final ``model/``;
- tag ``status`` (``completed`` or ``failed``), and the MLflow run FINISHED or FAILED.

Design choices:

- The store. Without ``mlflow-tracking-uri``, ``sqlite:///<results-dir>/mlflow.db``. MLflow 3
  keeps the ``file:`` store (``./mlruns``) in maintenance mode and refuses it unless
  ``MLFLOW_ALLOW_FILE_STORE=true``; the SQLite store needs no server, and its SQLAlchemy and
  alembic are installed already (Flower uses them). One database per results folder holds all
  of its runs, so ``mlflow ui --backend-store-uri sqlite:///<results-dir>/mlflow.db`` (from a
  full ``mlflow`` install) compares them.
- The artifacts. MLflow puts a SQLite store's artifacts in ``./mlruns`` of the working
  directory, which under Flower is the SuperLink's. So for any ``sqlite:`` store the
  experiment is created with its artifacts beside the database (``mlartifacts/``, the name
  ``mlflow server`` uses); other stores (a tracking server) keep their own artifact root.
- The package. The ``mlflow`` extra installs ``mlflow-skinny``: the tracking client and
  stores without the server and UI's dependencies, which is all a run needs.
- One experiment, ``flhf``, for every FLHF run in a store: MLflow compares runs within an
  experiment. Each MLflow run is named after its run folder.
- ``MlflowClient`` with explicit run ids, never the fluent ``mlflow.start_run``: its active run
  is global to the process, where several runs can live (tests, in-process runs).
- ``<run-dir>/mlflow.json`` keeps the tracking URI, experiment id and run id, so that a resumed
  run continues the same MLflow run (metrics append to its history) rather than starting one.
  MLflow cannot delete metric points: rounds the killed attempt logged after its checkpoint
  appear twice at their step, the resumed run's with the later timestamp.
- One ``log_batch`` call per row, synchronous: a few milliseconds on the SQLite store, and a
  row that returned is stored. Errors are not caught here: the Tracker reports a failing sink
  once and goes on with the files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from flhf_core.common import atomic_write_json, read_json
from flhf_core.config import ConfigError
from flhf_core.results.rounds import METRIC_COLUMNS

EXPERIMENT = "flhf"
STATE_FILE = "mlflow.json"
ARTIFACT_FOLDER = "mlartifacts"

# Characters MLflow refuses in metric names become "_" (our names never have them; a
# stray one must not switch the whole sink off).
_NOT_IN_METRIC_NAMES = re.compile(r"[^/\w.\- :]")

T = TypeVar("T")


def require_mlflow() -> None:
    """Raise :class:`ConfigError` naming the optional extra when MLflow cannot be imported."""
    try:
        import mlflow  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            "tracking: 'mlflow' needs MLflow, an optional extra: pip install -e '.[mlflow]' "
            f"({type(error).__name__}: {error})"
        ) from error


def default_tracking_uri(results_dir: Path) -> str:
    """The local store of a results folder: ``sqlite:///<results-dir>/mlflow.db`` (see the module doc)."""
    return f"sqlite:///{(Path(results_dir).resolve() / 'mlflow.db').as_posix()}"


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database, else the store's choice."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
    return (database.resolve().parent / ARTIFACT_FOLDER).as_uri()


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class MlflowSink:
    """One FLHF run as one MLflow run: what :class:`flhf_core.results.tracking.Tracker` forwards."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], resumed: bool) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = str(config.get("mlflow-tracking-uri") or "") or default_tracking_uri(
            Path(str(config["results-dir"]))
        )
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self._terminated = False
        self.run_id = self._resumed_run(run_dir) if resumed else None
        if self.run_id is None:
            self.experiment_id = self._experiment_id()
            run = self.client.create_run(
                self.experiment_id, run_name=run_dir.name, tags={"flhf.run-dir": str(run_dir)}
            )
            self.run_id = run.info.run_id
            atomic_write_json(
                run_dir / STATE_FILE,
                {
                    "tracking-uri": self.tracking_uri,
                    "experiment-id": self.experiment_id,
                    "run-id": self.run_id,
                },
            )
        self._log_params(config)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(
                EXPERIMENT, artifact_location=artifact_location(self.tracking_uri)
            )
        except MlflowException as error:  # another run created it meanwhile
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(EXPERIMENT).experiment_id

    def _resumed_run(self, run_dir: Path) -> str | None:
        """The MLflow run of the run being resumed, running again; None to start a new one
        (no ``mlflow.json``, or it names another store: the results folder or URI changed)."""
        from mlflow.entities import RunStatus

        path = run_dir / STATE_FILE
        if not path.is_file():
            return None
        state = read_json(path)
        if state.get("tracking-uri") != self.tracking_uri:
            return None
        run = self.client.get_run(state["run-id"])  # a run the store lost is an error worth reporting
        self.experiment_id = run.info.experiment_id
        # an extended run (more rounds after it completed) is running again
        self.client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run.info.run_id

    def _log_params(self, config: Mapping[str, Any]) -> None:
        """Every config key as a param. MLflow params cannot change, and a resume may change
        some keys (``num-server-rounds``, ``device``): a changed value goes to tag
        ``resumed-with/<key>`` instead."""
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        logged = self.client.get_run(self.run_id).data.params
        params, tags = [], []
        for key, value in config.items():
            text = str(value)[:MAX_PARAM_VAL_LENGTH]  # MLflow refuses longer values (paths can be long)
            if key not in logged:
                params.append(Param(key, text))
            elif logged[key] != text:
                tags.append(RunTag(f"resumed-with/{key}", text))
        for chunk in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk, synchronous=True)
        for chunk in _chunks(tags, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk, synchronous=True)

    def log_row(self, row: Mapping[str, Any]) -> None:
        """A metrics row as one batch: finite numbers only, at step = round."""
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        client = row.get("client")
        if client is not None:
            prefix = f"user-{client}/"
        elif row.get("scope", "server") == "server":
            prefix = ""
        else:
            prefix = f"{row['scope']}/"
        step, timestamp = int(row["round"]), get_current_time_millis()
        metrics = [
            Metric(_NOT_IN_METRIC_NAMES.sub("_", prefix + key), float(value), timestamp, step)
            for key, value in row.items()
            if key not in METRIC_COLUMNS and isinstance(value, int | float) and math.isfinite(value)
        ]
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def finish(self, run_dir: Path, status: str) -> None:
        """The run's end: its summary, plots and model as artifacts; FINISHED or FAILED."""
        summary = run_dir / "summary.json"
        if summary.is_file():
            self.client.log_artifact(self.run_id, str(summary))
        for folder in ("plots", "model"):  # no model/ for personalization=local-head
            if (run_dir / folder).is_dir():
                self.client.log_artifacts(self.run_id, str(run_dir / folder), artifact_path=folder)
        self.client.set_tag(self.run_id, "status", status)
        self._terminate("FINISHED" if status == "completed" else "FAILED")

    def close(self) -> None:
        """A run that ends without :meth:`finish` (an exception escaped the round loop) failed.
        Nothing else is open: MLflow keeps one database engine per URI for the process."""
        if not self._terminated:
            self._terminate("FAILED")

    def _terminate(self, mlflow_status: str) -> None:
        self.client.set_terminated(self.run_id, status=mlflow_status)
        self._terminated = True
