"""The notebook runs from top to bottom, as a reader would run it (nbclient, a real kernel),
while another run goes on in a terminal: each launcher owns its SuperLink."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nbformat
import pytest
from conftest import SHORT_TEXTS
from nbclient import NotebookClient
from test_end_to_end import check_feedback_run, check_smoke_run, flhf_background, processes_mentioning

ROOT = Path(__file__).resolve().parent.parent
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


@pytest.mark.slow
def test_the_notebook_and_a_terminal_run_at_once_each_complete_with_their_own_superlink(
    tmp_path, monkeypatch
):
    """A researcher works through the notebook (a supervised and a feedback federation of the
    smoke preset, their users' summaries, reward curves and comparison) while a feedback run
    with LoRA adapters and softmax weighting goes on in a terminal. Neither stops the other."""
    home = tmp_path / "home"  # nothing shared through ~/.flwr either
    home.mkdir()
    terminal = flhf_background(
        "run",
        "feedback-smoke",
        "--quiet",
        f"results-dir={tmp_path / 'terminal'}",
        "reward-weighting=softmax",
        "max-client-weight=0.6",
        "personalization=lora",
        "lora-rank=4",
        *SHORT_TEXTS,
        env={**os.environ, "HOME": str(home)},
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("FLHF_NOTEBOOK_RESULTS", str(tmp_path / "notebook"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=170, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    finally:
        terminal_out, terminal_err = terminal.communicate(timeout=300)
    assert terminal.returncode == 0 and "finished:completed" in terminal_out, terminal_out + terminal_err

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
    check_feedback_run(tmp_path / "terminal" / "feedback-smoke", tmp_path)

    ports = superlink_ports(printed) + superlink_ports(terminal_out)
    assert len(ports) == 3 and len(set(ports)) == 3  # two notebook runs and the terminal's, each its own
    time.sleep(1)
    assert not [p for port in ports for p in processes_mentioning(f"--port {port}")], "a SuperLink was left"
