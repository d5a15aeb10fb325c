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

from flhf_core import credentials
from flhf_core.cli import merged_config, submit_and_follow
from flhf_core.deploy import CONNECTION, Loopback, flower_bin
from flhf_core.tracking import read_metrics


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f}s")
        time.sleep(0.2)


@pytest.mark.slow
def test_secure_loopback_federation_with_personal_adapters(tmp_path):
    results = tmp_path / "results"
    command = [sys.executable, "-m", "flhf_core.cli", "loopback", "smoke", "--secure", "--quiet"]
    command += [f"results-dir={results}", "personalization=lora", "lora-rank=4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=500, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "finished:completed" in result.stdout
    run_dir, deployment = results / "smoke", results / "smoke.deployment"
    assert (run_dir / "model" / "model.safetensors").is_file()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert {r["client"] for r in rows if r["scope"] == "client"} == {0, 1}
    assert all(r["failures"] == 0 for r in rows if r["scope"] == "server" and r["round"] > 0)

    # the SuperLink ran with TLS and SuperNode authentication, and the nodes connected through it
    superlink = (deployment / "superlink.log").read_text()
    assert "SuperNode authentication is disabled" not in superlink
    assert all("--auth-supernode-private-key" in c for c in processes_started(deployment, "supernode"))

    # bytes counted from the records sent agree with Flower's own traffic figures
    summary = json.loads((run_dir / "summary.json").read_text())
    traffic = json.loads((run_dir / "flower-run.json").read_text())["network-traffic"]
    assert summary["bytes-down"] <= traffic["outbound-bytes"] <= 1.02 * summary["bytes-down"]
    assert summary["bytes-up"] <= traffic["inbound-bytes"] <= 1.02 * summary["bytes-up"]

    # each user's adapter is on its own disk (the SuperNode's state-dir), never in the server's model
    for user in (0, 1):
        state = load_file(str(deployment / "user-state" / "smoke" / f"user-{user}" / "personal.safetensors"))
        assert state and all("lora_" in name for name in state)
    server_model = load_file(str(run_dir / "model" / "model.safetensors"))
    assert not any("lora_" in name for name in server_model)

    time.sleep(1)  # every server was stopped with its whole process group (superexec children included)
    port = re.search(r"SuperNodes up \(127\.0\.0\.1:(\d+),", result.stdout).group(1)
    assert not processes_mentioning(f"127.0.0.1:{port}"), "a Flower process was left running"
    assert not processes_mentioning(str(deployment)), "a SuperNode was left running"


def processes_started(deployment, prefix: str) -> list[str]:
    """The commands the launcher recorded for its processes (first line of each log)."""
    return [p.read_text().splitlines()[0] for p in deployment.glob(f"{prefix}-*.log")]


@pytest.mark.slow
def test_a_secure_superlink_refuses_unregistered_and_insecure_supernodes(tmp_path):
    with Loopback(tmp_path, users=1, state_dir=tmp_path / "state", secure=True) as federation:
        stranger = credentials.node_key(tmp_path / "stranger.key")  # a valid key nobody registered
        ca = str(federation.credentials.ca_cert)
        give_up = ["--max-wait-time", "10"]
        refused = {
            "unregistered": [
                "--root-certificates",
                ca,
                "--auth-supernode-private-key",
                str(stranger),
                *give_up,
            ],
            "insecure": ["--insecure", *give_up],
        }
        for name, security in refused.items():
            federation.spawn(name, federation.supernode_command(0, security=security))
        for name in refused:
            assert federation.processes[name].wait(timeout=60) != 0, name
            log = (tmp_path / f"{name}.log").read_text()
            assert "could not establish a connection to the SuperLink" in log, log

        # the registered node is the only one the SuperLink knows, and it is online
        listing = subprocess.run(
            [flower_bin("flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
            capture_output=True,
            text=True,
            env=federation.env(),
            check=True,
        )
        nodes = json.loads(listing.stdout)["nodes"]
        assert [n["status"] for n in nodes] == ["online"], nodes
        assert federation.processes["supernode-0"].poll() is None


@pytest.mark.slow
def test_a_supernode_killed_during_training_is_counted_and_the_run_completes(tmp_path):
    """SIGKILL user 2's SuperNode (its ClientApp with it) while it trains in round 2 of 2.

    Round 1 lets the server learn which user each node serves; round 2 must then finish
    with the two survivors, after at most ``round-timeout`` seconds of waiting.
    """
    overrides = [f"results-dir={tmp_path / 'results'}", "run-name=kill", "num-server-rounds=2"]
    overrides += ["min-available-nodes=2", "round-timeout=150"]  # a round waits for 2 survivors, <= 150 s
    config = merged_config("smoke", overrides)
    outcome: dict[str, int] = {}
    with Loopback(tmp_path / "deployment", users=3, state_dir=tmp_path / "state") as federation:
        run = threading.Thread(
            target=lambda: outcome.update(
                code=submit_and_follow(config, [CONNECTION], False, federation.env())
            )
        )
        run.start()
        marker = federation.marker(2)
        wait_for(
            lambda: marker.is_file() and marker.read_text().strip() == "2",
            timeout=400,
            what="user 2 did not start training in round 2",
        )
        os.killpg(federation.processes["supernode-2"].pid, signal.SIGKILL)  # the machine dies
        run.join(timeout=450)
        assert not run.is_alive(), "the run did not end after a SuperNode was killed"
    assert outcome["code"] == 0

    rows = read_metrics(tmp_path / "results" / "kill" / "metrics.jsonl")
    server = {r["round"]: r for r in rows if r["scope"] == "server"}
    assert server[1]["failures"] == 0 and server[1]["clients"] == 3
    assert server[2]["failures"] == 1 and server[2]["clients"] == 2  # aggregated from the survivors
    failed = [r for r in rows if r.get("failed")]
    assert failed and all(r["client"] == 2 and r["round"] == 2 for r in failed), failed  # the user is named
    assert json.loads((tmp_path / "results" / "kill" / "summary.json").read_text())["failures"] == 1
