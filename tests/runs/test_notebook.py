"""The notebook runs from top to bottom, as a reader would run it (nbclient, a real kernel)."""

from __future__ import annotations

import json
import time

import nbformat
import pytest
from flower_runs import check_smoke_run, processes_mentioning
from nbclient import NotebookClient

from flhf_core.config import PYPROJECT

ROOT = PYPROJECT.parent
NOTEBOOK = ROOT / "notebooks" / "poc_flhf_summarization.ipynb"


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def superlink_ports(text: str) -> list[str]:
    return [
        line.split("127.0.0.1:")[1].split()[0]
        for line in text.splitlines()
        if "SuperLink of this run" in line
    ]


@pytest.mark.flower
def test_the_notebook_runs_two_federations_shows_their_users_and_compares_them(tmp_path, monkeypatch):
    """A reader runs the notebook: a supervised and a feedback federation of the smoke preset,
    their users' summaries, the reward curves and the comparison."""
    monkeypatch.setenv("FLHF_NOTEBOOK_RESULTS", str(tmp_path / "notebook"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=170, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    printed = "".join(o.get("text", "") for o in outputs)
    check_smoke_run(tmp_path / "notebook" / "fedavg-sft", printed, tmp_path)
    assert (
        json.loads((tmp_path / "notebook" / "reinforce" / "summary.json").read_text())["status"]
        == "completed"
    )
    assert "reward" in (tmp_path / "notebook" / "comparison.md").read_text()
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 2  # reward curves, comparison
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "utility" in html and "reference" in html  # each user's summaries, judged
    ports = [
        line.split("127.0.0.1:")[1].split()[0]
        for line in printed.splitlines()
        if "SuperLink of this run" in line
    ]
    assert len(ports) == 2
    time.sleep(1)
    assert not [p for port in ports for p in processes_mentioning(f"--port {port}")], "a SuperLink was left"
