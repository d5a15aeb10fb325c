"""The same app in Flower's deployment engine: a SuperLink and SuperNodes as OS processes on 127.0.0.1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from safetensors.numpy import load_file
from test_end_to_end import processes_mentioning

from flhf_core.tracking import read_metrics


@pytest.mark.slow
def test_loopback_federation_with_personal_adapters(tmp_path):
    results = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "flhf_core.cli",
        "loopback",
        "smoke",
        "--quiet",
        f"results-dir={results}",
        "personalization=lora",
        "lora-rank=4",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=500, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "finished:completed" in result.stdout
    run_dir = results / "smoke"
    assert (run_dir / "model" / "model.safetensors").is_file()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert {r["client"] for r in rows if r["scope"] == "client"} == {0, 1}
    assert all(r["failures"] == 0 for r in rows if r["scope"] == "server" and r["round"] > 0)

    # bytes counted from the records sent agree with Flower's own traffic figures
    summary = json.loads((run_dir / "summary.json").read_text())
    traffic = json.loads((run_dir / "flower-run.json").read_text())["network-traffic"]
    assert summary["bytes-down"] <= traffic["outbound-bytes"] <= 1.02 * summary["bytes-down"]
    assert summary["bytes-up"] <= traffic["inbound-bytes"] <= 1.02 * summary["bytes-up"]

    # each user's adapter is on its own disk (the SuperNode's state-dir), never in the server's model
    for user in (0, 1):
        state_file = (
            run_dir.parent
            / "smoke.deployment"
            / "user-state"
            / "smoke"
            / f"user-{user}"
            / "personal.safetensors"
        )
        state = load_file(str(state_file))
        assert state and all("lora_" in name for name in state)
    server_model = load_file(str(run_dir / "model" / "model.safetensors"))
    assert not any("lora_" in name for name in server_model)

    time.sleep(1)  # every server was stopped with its whole process group (superexec children included)
    port = re.search(r"SuperNodes up \(127\.0\.0\.1:(\d+)\)", result.stdout).group(1)
    assert not processes_mentioning(f"127.0.0.1:{port}"), "a Flower process was left running"
    assert not processes_mentioning(str(run_dir.parent / "smoke.deployment")), "a SuperNode was left running"
