"""The same app in Flower's deployment engine: a SuperLink and SuperNodes as OS processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from safetensors.numpy import load_file
from test_end_to_end import processes_mentioning

from flhf_core.cli import merged_config, submit_and_follow
from flhf_core.deploy import CONNECTION, Loopback
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


@pytest.mark.slow
def test_a_supernode_killed_during_training_is_counted_and_the_run_completes(tmp_path):
    """SIGKILL one SuperNode while its ClientApp trains (synchronized by its training marker)."""
    results = tmp_path / "results"
    overrides = [f"results-dir={results}", "num-server-rounds=3", "round-timeout=20", "min-available-nodes=2"]
    config = merged_config("smoke", overrides)
    codes: list[int] = []
    with Loopback(tmp_path / "deployment", users=3, state_dir=tmp_path / "state") as federation:
        thread = threading.Thread(
            target=lambda: codes.append(submit_and_follow(config, [CONNECTION], False, federation.env()))
        )
        thread.start()
        marker = federation.marker(2)
        deadline = time.monotonic() + 300
        while not (marker.exists() and marker.read_text().strip() == "2"):  # user 2 starts round 2
            assert time.monotonic() < deadline and thread.is_alive(), "user 2 never started round 2"
            time.sleep(0.2)
        os.killpg(federation.processes["supernode-2"].pid, signal.SIGKILL)
        thread.join(timeout=600)
    assert codes == [0]
    rows = read_metrics(results / "smoke" / "metrics.jsonl")
    server = {r["round"]: r for r in rows if r["scope"] == "server"}
    assert server[1]["failures"] == 0 and server[2]["failures"] >= 1
    assert server[3]["clients"] == 2  # the run went on with the survivors
    failed = [r for r in rows if r.get("failed") and r["round"] == 2]
    assert failed and all(r["client"] == 2 for r in failed)  # which user failed
    assert json.loads((results / "smoke" / "summary.json").read_text())["failures"] >= 1
