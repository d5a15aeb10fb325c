"""The launcher: its own run folder, its own SuperLink, and nothing left behind however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from flower_runs import flhf_background, free_port, processes_mentioning

from flhf_core.results.tracking import CLAIM, claim_run_dir, new_run_dir
from flhf_core.runs import cli
from flhf_core.runs.deploy import owns_port


def test_two_launchers_in_the_same_second_get_two_folders_and_the_serverapp_writes_into_its_own(tmp_path):
    first, second = claim_run_dir(tmp_path, "run-x"), claim_run_dir(tmp_path, "run-x")
    assert first.name == "run-x" and second.name == "run-x-2" and (second / CLAIM).is_file()
    assert new_run_dir(tmp_path, "run-x-2") == second and not (second / CLAIM).exists()
    assert new_run_dir(tmp_path, "run-x-2").name == "run-x-2-2"  # taken now: never reused


def test_fewer_users_than_the_run_waits_for_are_refused_before_anything_starts(tmp_path, capsys):
    code = cli.main(["run", "smoke", "--users", "1", f"results-dir={tmp_path}"])
    assert code == 2 and "min-available-nodes=2" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no run folder, no SuperLink


def test_a_port_answered_by_another_process_is_not_taken_for_ours():
    port = free_port()
    listener = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); time.sleep(30)",
        ],
        start_new_session=True,
    )
    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not owns_port(listener, port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert owns_port(listener, port) and not owns_port(impostor, port)
    finally:
        listener.kill(), impostor.kill()
        listener.wait(), impostor.wait()


def test_a_killed_launchers_watchdog_stops_the_processes_it_started_in_other_sessions(tmp_path):
    """SIGKILL reaches no child; the launcher's grandchild in a session of its own (as Flower's
    SuperExec and Ray's processes are) is stopped by the watchdog."""
    pid_file = tmp_path / "grandchild.pid"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import subprocess, sys, time
                from flhf_core.runs import watchdog
                watchdog.start()
                child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
                open({str(pid_file)!r}, "w").write(str(child.pid))
                time.sleep(120)
            """),
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the launcher never started its child"
            time.sleep(0.1)
        grandchild = int(pid_file.read_text())
        time.sleep(1.5)  # the watchdog's scans see the whole tree
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(grandchild)
    finally:
        launcher.kill()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, waiting for its parent


@pytest.mark.flower
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL])
def test_a_launcher_stopped_by_ctrl_c_or_killed_leaves_no_flower_process(tmp_path, stop):
    """Ctrl-C: everything it started is stopped, exit 130, no traceback. SIGKILL: its watchdog
    stops the SuperLink, SuperExec and simulation processes it can no longer stop itself."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    launcher = flhf_background("run", "smoke", f"results-dir={tmp_path}", env=env)
    port = None
    for line in launcher.stdout:
        if "SuperLink of this run on 127.0.0.1:" in line:
            port = line.split("127.0.0.1:")[1].split()[0]
        if "submitted" in line:  # the run is in the SuperLink's hands: Flower processes are up
            break
    assert port, "the launcher never said where its SuperLink is"
    time.sleep(3)
    launcher.send_signal(stop)
    _, err = launcher.communicate(timeout=60)
    if stop == signal.SIGINT:
        assert launcher.returncode == 130 and "Traceback" not in err, err
        assert "interrupted; every process it started is stopped" in err
    deadline = time.monotonic() + 20
    while processes_mentioning(f"127.0.0.1:{port}") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_mentioning(f"127.0.0.1:{port}")
