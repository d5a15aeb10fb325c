"""The same app in Flower's deployment engine: a SuperLink and SuperNodes as OS processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHORT_TEXTS
from flower_runs import processes_mentioning
from safetensors.numpy import load_file

from flhf_core.results.tracking import read_metrics
from flhf_core.runs import cli, credentials
from flhf_core.runs.deploy import (
    CONNECTION,
    Loopback,
    flower_bin,
    flower_env,
    free_port,
    spawn_logged,
    stop_process_group,
    training_marker,
    write_connection,
)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f}s")
        time.sleep(0.2)


def supernode_pid(deployment, user: int) -> int:
    """The PID (and process group) of the SuperNode serving ``user`` in ``deployment``."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(cmdline).decode(errors="replace")
        if "flower-supernode" in text and f"partition-id={user} " in text and str(deployment) in text:
            return int(proc.name)
    raise LookupError(f"no SuperNode for user {user} under {deployment}")


def test_flwr_json_stays_json_when_the_caller_forces_colours(tmp_path, monkeypatch):
    """A Jupyter kernel sets FORCE_COLOR: ``flwr ... --format json`` then wrapped its JSON in
    ANSI colour codes and the launcher could not read the run id (the notebook's runs failed)."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("CLICOLOR_FORCE", "1")
    write_connection(tmp_path, free_port())  # a private FLWR_HOME: no local SuperLink is started
    result = subprocess.run(
        [flower_bin("flwr"), "ls", "--format", "json"],
        capture_output=True,
        text=True,
        env=flower_env(FLWR_HOME=str(tmp_path)),
        timeout=60,
    )
    assert "\x1b[" not in result.stdout and json.loads(result.stdout)  # plain JSON (no SuperLink there)


def test_stopping_a_server_returns_as_soon_as_its_process_group_is_gone(tmp_path):
    """A leader that exits on SIGTERM stays a zombie until reaped, and a zombie still counts as
    a member of its group: the stop waited the whole grace period for every server."""
    server = spawn_logged(
        [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log", dict(os.environ)
    )
    started = time.monotonic()
    stop_process_group(server, grace=8.0)
    assert time.monotonic() - started < 4.0 and server.returncode is not None


@pytest.mark.flower
def test_secure_loopback_federation_survives_a_supernode_killed_during_training(tmp_path):
    """``flhf loopback --secure`` with 3 users and personal LoRA adapters; user 2's SuperNode
    (its ClientApp with it) is SIGKILLed while it trains in round 1 of 1.

    The server knows which user each node serves before round 1 (it asks them); the round must
    then finish with the two survivors, and the final evaluation go on without the dead node.
    Flower notices the dead node after 30 to 60 s without heartbeats and answers its message
    with an error; ``round-timeout`` bounds the wait in any case.
    """
    results = tmp_path / "results"
    run_dir, deployment = results / "smoke", results / "smoke.deployment"
    own_data = tmp_path / "user-1.jsonl"  # user 1 serves itself from its own data file
    assert cli.main(["export-data", "smoke", "--user", "1", "--users", "3", "--out", str(own_data)]) == 0
    command = [
        sys.executable,
        "-m",
        "flhf_core.runs.cli",
        "loopback",
        "smoke",
        "--secure",
        "--users",
        "3",
        "--quiet",
        "--data-file",
        f"1={own_data}",
    ]
    command += [f"results-dir={results}", "num-server-rounds=1", "min-available-nodes=2", "round-timeout=150"]
    command += ["personalization=lora", "lora-rank=4", *SHORT_TEXTS]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        marker = training_marker(deployment, 2)
        wait_for(
            lambda: marker.is_file() and marker.read_text().strip() == "1", 400, "user 2 trains in round 1"
        )
        os.killpg(supernode_pid(deployment, 2), signal.SIGKILL)  # the machine dies
        output, _ = launcher.communicate(timeout=400)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output
    assert "finished:completed" in output

    # the run completed with the survivors, and metrics.jsonl names the failed user
    rows = read_metrics(run_dir / "metrics.jsonl")
    server = {r["round"]: r for r in rows if r["scope"] == "server"}
    assert server[1]["failures"] == 1 and server[1]["clients"] == 2  # aggregated from the survivors
    failed = [r for r in rows if r.get("failed")]
    assert failed and all(r["client"] == 2 and r["round"] == 1 for r in failed), failed
    evaluated = {r["client"] for r in rows if r["scope"] == "client" and "reward" in r}
    assert evaluated == {0, 1}  # the final evaluation, by the survivors
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failures"] == 1
    assert (run_dir / "model" / "model.safetensors").is_file()
    # user 1 trained on its own file, which the server never saw
    assert json.loads((run_dir / "splits.json").read_text())["users"]["1"] == {"own-data": True}
    assert f'data-file="{own_data}"' in (deployment / "supernode-1.log").read_text().splitlines()[0]
    trained = {r["round"] for r in rows if r["scope"] == "client" and r["client"] == 1 and "train-loss" in r}
    assert trained == {1}

    # TLS and SuperNode authentication were on, and every SuperNode connected through them
    assert "SuperNode authentication is disabled" not in (deployment / "superlink.log").read_text()
    for user in range(3):
        started = (deployment / f"supernode-{user}.log").read_text().splitlines()[0]
        assert "--root-certificates" in started and "--auth-supernode-private-key" in started

    # bytes counted from the records sent agree with Flower's own traffic figures
    traffic = json.loads((run_dir / "flower-run.json").read_text())["network-traffic"]
    assert summary["bytes-down"] <= traffic["outbound-bytes"] <= 1.02 * summary["bytes-down"]
    assert summary["bytes-up"] <= traffic["inbound-bytes"] <= 1.02 * summary["bytes-up"]

    # each user's adapter is on its own disk (the SuperNode's state-dir), never in the server's model
    for user in range(2):  # the survivors (user 2 died before it could save)
        state = load_file(str(deployment / "user-state" / "smoke" / f"user-{user}" / "personal.safetensors"))
        assert state and all("lora_" in name for name in state)
    assert not any("lora_" in name for name in load_file(str(run_dir / "model" / "model.safetensors")))

    time.sleep(1)  # every server was stopped with its whole process group (superexec children included)
    port = re.search(r"SuperNodes up \(127\.0\.0\.1:(\d+),", output).group(1)
    assert not processes_mentioning(f"127.0.0.1:{port}"), "a Flower process was left running"
    assert not processes_mentioning(str(deployment)), "a SuperNode was left running"


@pytest.mark.flower
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


@pytest.mark.flower
def test_flhf_register_nodes_registers_every_key_with_a_secure_superlink(tmp_path, capsys):
    """The secure profile's two steps, on loopback: credentials, then the keys registered."""
    from flhf_core.runs.deploy import flower_bin, flower_env, spawn_logged, stop_process_group, wait_for_port

    folder = tmp_path / "credentials"
    assert cli.main(["credentials", "--out", str(folder), "--users", "2", "--host", "127.0.0.1"]) == 0
    port = free_port()
    command = [flower_bin("flower-superlink"), "--ssl-ca-certfile", str(folder / "ca.crt")]
    command += ["--ssl-certfile", str(folder / "server.pem"), "--ssl-keyfile", str(folder / "server.key")]
    command += [
        "--enable-supernode-auth",
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    superlink = spawn_logged(
        command, tmp_path / "superlink.log", flower_env(FLWR_HOME=str(tmp_path / "home"))
    )
    try:
        wait_for_port(superlink, port, "superlink", tmp_path)
        capsys.readouterr()
        assert cli.main(["register-nodes", str(folder), "--superlink", f"127.0.0.1:{port}"]) == 0
        out = capsys.readouterr().out
        assert out.count("registered supernode-") == 2, out
    finally:
        stop_process_group(superlink)
