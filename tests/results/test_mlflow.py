"""MLflow tracking: a federation read back with MLflow's own client, a resumed run that goes on
in the same MLflow run, a failing store that costs the run nothing, and the missing extra.

MLflow is not skipped when absent: CI installs the ``mlflow`` extra, so its absence is a failure.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flhf_core.config import ConfigError, RunConfig
from flhf_core.results.mlflow_sink import MlflowSink, default_tracking_uri, require_mlflow
from flhf_core.results.tracking import read_metrics
from flhf_core.runs.cli import merged_config
from flhf_core.runs.inprocess import run_in_process

# A small local corpus and short sequences keep a federation of the smoke preset to seconds:
# these tests are about what reaches MLflow, not about what the model learns.
DOCUMENTS = [
    {
        "paper": f"Document {i}. We propose method {i % 5} for task {i % 3}; it gains {i} points.",
        "tldr": f"Method {i % 5} for task {i % 3}.",
        "key": f"gains {i} points",
    }
    for i in range(30)
]


def federation(tmp_path, *overrides: str):
    """The smoke preset, shrunk, in-process with 2 users; its run folder."""
    dataset = tmp_path / "documents.jsonl"
    dataset.write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    small = [
        f"results-dir={tmp_path}",
        f"dataset={dataset}",
        "document-field=paper",
        "summary-fields=tldr,key",
        "max-source-tokens=32",
        "max-target-tokens=12",
        "max-new-tokens=8",
        "eval-max-examples=2",
        "heldout-max-examples=3",
        "reward-documents=2",
        "bf16=false",
    ]
    return run_in_process(RunConfig.from_mapping(merged_config("smoke", [*small, *overrides])), 2)


def test_a_federation_reads_back_from_mlflow(tmp_path):
    run_dir = federation(tmp_path, "tracking=tensorboard,mlflow")
    state = json.loads((run_dir / "mlflow.json").read_text())
    assert state["tracking-uri"] == default_tracking_uri(tmp_path)  # the store is in the results folder
    client = MlflowClient(tracking_uri=state["tracking-uri"])
    run = client.get_run(state["run-id"])

    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert run.info.run_name == run_dir.name and run.info.experiment_id == state["experiment-id"]
    config = json.loads((run_dir / "config.json").read_text())
    assert set(run.data.params) == set(config)  # every key of the resolved config
    assert run.data.params["seed"] == "42" and run.data.params["num-server-rounds"] == "2"

    # every server metric per round (step = round), each user's under user-<k>/, as metrics.jsonl
    rows = read_metrics(run_dir / "metrics.jsonl")

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    server = {r["round"]: r["rougeL"] for r in rows if r["scope"] == "server"}
    assert set(server) == {0, 1, 2}
    assert history("rougeL") == pytest.approx(server)
    user = {r["round"]: r["reward"] for r in rows if r["client"] == 1 and "reward" in r}
    assert user and history("user-1/reward") == pytest.approx(user)
    assert "round" not in run.data.metrics and "user-1/client" not in run.data.metrics

    # the results as artifacts, beside the store
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "plots", "model"} <= top
    assert "plots/rougeL.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "model/config.json" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    copy = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(copy).read_text()) == json.loads((run_dir / "summary.json").read_text())


def test_a_failing_store_is_reported_once_and_the_run_completes(tmp_path, caplog):
    blocker = tmp_path / "a-file"  # the store's folder is a regular file: nothing can be written
    blocker.write_text("")
    caplog.set_level(logging.WARNING, logger="flwr")
    run_dir = federation(
        tmp_path,
        "tracking=mlflow",
        f"mlflow-tracking-uri=sqlite:///{blocker}/mlflow.db",
        "num-server-rounds=1",
    )

    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert {r["round"] for r in read_metrics(run_dir / "metrics.jsonl")} == {0, 1}
    assert (run_dir / "plots" / "rougeL.png").is_file() and (run_dir / "model").is_dir()
    reports = [r for r in caplog.records if "tracking: mlflow failed" in r.getMessage()]
    assert len(reports) == 1, [r.getMessage() for r in reports]
    assert not (run_dir / "mlflow.json").exists()


def test_a_resumed_run_goes_on_in_the_same_mlflow_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {"results-dir": str(tmp_path), "seed": 7, "num-server-rounds": 2, "user-profiles": "x" * 7000}
    first = MlflowSink(run_dir, config, resumed=False)
    first.log_row({"round": 1, "phase": "sft", "scope": "server", "client": None, "rougeL": 1.0, "x": None})
    first.close()  # killed without finish: a failed run, until it is resumed
    client = first.client
    assert client.get_run(first.run_id).info.status == "FAILED"
    assert len(client.get_run(first.run_id).data.params["user-profiles"]) == 6000  # MLflow's limit

    resumed = MlflowSink(run_dir, {**config, "num-server-rounds": 3}, resumed=True)
    assert resumed.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    resumed.log_row({"round": 2, "phase": "sft", "scope": "server", "client": None, "rougeL": 2.0})
    resumed.finish(run_dir, "failed")  # no summary, plots or model: nothing to upload
    run = client.get_run(first.run_id)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"
    # params cannot change in MLflow: the resumed value is a tag
    assert (
        run.data.params["num-server-rounds"] == "2" and run.data.tags["resumed-with/num-server-rounds"] == "3"
    )
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "rougeL")] == [
        (1, 1.0),
        (2, 2.0),
    ]

    (run_dir / "mlflow.json").unlink()  # nothing to go on from: a new MLflow run
    fresh = MlflowSink(run_dir, config, resumed=True)
    assert fresh.run_id != first.run_id and fresh.experiment_id == run.info.experiment_id
    fresh.close()


def test_missing_mlflow_names_the_extra(monkeypatch):
    require_mlflow()  # installed here: nothing to say
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without it gives
    with pytest.raises(ConfigError, match=r"tracking: 'mlflow' needs MLflow.*pip install -e '\.\[mlflow\]'"):
        require_mlflow()
