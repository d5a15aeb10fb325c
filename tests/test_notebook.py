"""The notebook runs from top to bottom, as a reader would run it (nbclient, a real kernel)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "poc_flhf_summarization.ipynb"


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_the_notebook_runs_two_federations_and_compares_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FLHF_NOTEBOOK_RESULTS", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=170, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    for run in ("fedavg-sft", "reinforce"):
        assert json.loads((tmp_path / run / "summary.json").read_text())["status"] == "completed"
    assert "reward" in (tmp_path / "comparison.md").read_text()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the reward curves and the comparison plot were shown
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "utility" in html and "reference" in html  # each user's summaries, judged
