"""Launching a run: submit it to a SuperLink with ``flwr run``, follow it, and tell its real status.

``flwr run --stream`` can exit 0 for a failed run; here a run's status comes from
``flwr ls``, a SuperLink that vanished is reported as such, and the run folder keeps
Flower's log and record of the run. :func:`launch_simulation` is ``flhf run``: a
simulation SuperLink of its own (a free port, a private ``FLWR_HOME``: two runs at once
never share or stop each other's), stopped afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flhf_core.common import atomic_write_json, atomic_write_text
from flhf_core.config import PYPROJECT
from flhf_core.runs.deploy import CONNECTION, LocalSimulation, flower_bin, flower_env

PROJECT_DIR = PYPROJECT.parent


def _flwr(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [flower_bin("flwr"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env or flower_env(), check=False)


def run_info(run_id: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The run as ``flwr ls --run-id ID --format json`` describes it (empty if unknown)."""
    result = _flwr("ls", "--run-id", run_id, "--format", "json", env=env)
    try:
        return json.loads(result.stdout)["runs"][0]
    except (json.JSONDecodeError, KeyError, IndexError):
        return {}


def stage_app(folder: Path) -> Path:
    """A copy of the app's candidate files (git's tracked and untracked-not-ignored ones) in
    ``folder``, for ``flwr run`` to bundle; the project itself where git cannot list them.

    ``flwr run PROJECT`` walks every file under the project, ``.venv`` included, before it
    applies ``.gitignore`` and ``fab-include``: 5 of the 6 seconds a submission took here.
    Flower still filters the copy by the same rules, so the bundle is the same.
    """
    try:
        listed = subprocess.run(
            ["git", "-C", str(PROJECT_DIR), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=False,
        )
    except OSError:  # no git on this machine
        return PROJECT_DIR
    names = [n for n in listed.stdout.decode().split("\0") if n] if listed.returncode == 0 else []
    if "pyproject.toml" not in names:  # not a git checkout (an unpacked archive): Flower walks it
        return PROJECT_DIR
    folder = folder / "flhf"  # Flower accepts only letters, digits and hyphens in the app's folder name
    for name in names:
        source = PROJECT_DIR / name
        if source.is_file() and not source.is_symlink():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # deleted since git listed it
                shutil.copy2(source, folder / name)
    return folder


def submit_and_follow(
    config: dict[str, Any],
    flwr_args: list[str],
    stream: bool,
    env: dict[str, str],
    superlink_alive: Callable[[], bool],
) -> int:
    """Submit the run (``flwr run PROJECT *flwr_args``), follow it to its end, return 0 only if it completed.

    ``superlink_alive`` tells whether the SuperLink this launcher started still runs: a run
    whose SuperLink vanished is reported as such (here and in the run folder), not as a
    bare "unknown" status.
    """
    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as f:
        f.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()).encode())
        config_file = f.name
    try:
        with tempfile.TemporaryDirectory(prefix="flhf-app-") as staging:
            app = stage_app(Path(staging))
            command = ["run", str(app), *flwr_args, "--run-config", config_file, "--format", "json"]
            result = _flwr(*command, env=env)
    finally:
        os.unlink(config_file)
    try:
        run_id = str(json.loads(result.stdout)["run-id"])
    except (json.JSONDecodeError, KeyError):
        print(f"flhf: flwr run failed:\n{result.stdout}{result.stderr}", file=sys.stderr)
        return 1
    print(f"flhf: run {run_id} submitted", flush=True)
    log_lines = follow_logs(run_id, echo=stream, env=env)
    info = run_info(run_id, env)
    for _ in range(30):  # the log stream can end a moment before the status is final
        if info.get("status", "").startswith("finished") or not superlink_alive():
            break
        time.sleep(1.0)
        info = run_info(run_id, env)
    status, details = info.get("status", "unknown"), info.get("status-details", "")
    if not superlink_alive():
        status = "superlink-vanished"
        details = (
            "the SuperLink this run was submitted to stopped before the run finished (killed or crashed)"
        )
        info = {**info, "status": status, "status-details": details}
    run_dir = Path(config["results-dir"]) / config["run-name"]
    run_dir.mkdir(parents=True, exist_ok=True)  # a run that died early still says why, in its folder
    if run_dir.is_dir():
        atomic_write_text(run_dir / "flower.log", "".join(log_lines))
        atomic_write_json(run_dir / "flower-run.json", info)  # Flower's own view: status, traffic, time
    print(f"flhf: run {run_id} {status}" + (f": {details}" if details and details != "N/A" else ""))
    return 0 if status == "finished:completed" else 1


def follow_logs(run_id: str, echo: bool, env: dict[str, str] | None = None) -> list[str]:
    """Stream the run's logs until the run ends (``flwr log --stream`` returns then)."""
    process = subprocess.Popen(
        [flower_bin("flwr"), "log", run_id, "--stream"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env or flower_env(),
    )
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
        process.wait()
    except KeyboardInterrupt:
        print(f"flhf: interrupted; stopping run {run_id}", file=sys.stderr)
        process.terminate()
        _flwr("stop", run_id, env=env)
        raise
    return lines


def cpus_per_user(users: int, cores: int | None = None) -> int:
    """CPUs (and so torch threads) per simulated user: the cores shared by the users that can
    train at once. Flower's default, 2 per user, runs one user at a time on 2 cores, each
    using both; several 1-thread users at once get more done per second (small matrices
    parallelize poorly), and never oversubscribe the cores."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, min(users, cores)))


def launch_simulation(
    config: dict[str, Any], users: int | None = None, cpus: int | None = None, stream: bool = True
) -> int:
    """Run ``config`` (a validated run-config mapping) in Flower's simulation engine, on a
    SuperLink of its own; return 0 only if the run completed. What ``flhf run`` does, and
    :func:`flhf_core.runs.api.run_flhf_simulation` too."""
    users = users or max(int(config["min-available-nodes"]), 2)
    run_dir = Path(config["results-dir"]) / config["run-name"]
    print(f"flhf: results will be written to {run_dir}", flush=True)
    with tempfile.TemporaryDirectory(prefix="flhf-superlink-") as workdir:
        with LocalSimulation(Path(workdir)) as superlink:
            print(
                f"flhf: SuperLink of this run on 127.0.0.1:{superlink.port} (pid {superlink.process.pid})",
                flush=True,
            )
            cpus = cpus or cpus_per_user(users)
            print(f"flhf: {users} users, {cpus} CPU(s) and torch thread(s) each", flush=True)
            federation = [
                CONNECTION,
                "--federation-config",
                f"num-supernodes={users} client-resources-num-cpus={cpus}",
            ]
            code = submit_and_follow(config, federation, stream, superlink.env(), superlink.alive)
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(superlink.log_path, run_dir / "superlink.log")
    report(code, config)
    return code


def report(code: int, config: dict[str, Any]) -> None:
    """The run's headline figures, or why it failed, from its summary.json."""
    run_dir = Path(config["results-dir"]) / config["run-name"]
    if not (run_dir / "summary.json").is_file():
        if code != 0:
            print(f"flhf: the run failed before writing a summary; see {run_dir}", file=sys.stderr)
        return
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status") == "failed":
        print(
            f"flhf: the run failed in round {summary.get('failed-in-round')}: {summary.get('error')}\n"
            f"flhf: the rounds before it and the last good model are in {run_dir}",
            file=sys.stderr,
        )
        return
    if code != 0:
        return
    k = config["lead-words"]
    if summary.get("rougeL") is None:  # no global model (local-head, local-only): the users' own models
        key = "reward-personal" if summary.get("reward-personal") is not None else "reward"
        print(f"flhf: users' {key} {summary.get(key) or float('nan'):.3f}; results in {run_dir}")
        return
    print(
        f"flhf: held-out ROUGE-L {summary['rougeL']:.2f} (round 0: {summary['rougeL-round0']:.2f}, "
        f"lead-{k} baseline: {summary[f'baseline-lead{k}-rougeL']:.2f}); results in {run_dir}"
    )
    aspects = [
        key.removeprefix(f"baseline-lead{k}-rougeL-")
        for key in summary
        if key.startswith(f"baseline-lead{k}-rougeL-")
    ]
    if aspects and all(f"rougeL-{a}" in summary for a in aspects):
        print(
            "flhf: per aspect, model (first "
            f"{k} words / first / last sentence of the abstract): "
            + ", ".join(
                f"{a} {summary[f'rougeL-{a}']:.2f} ({summary[f'baseline-lead{k}-rougeL-{a}']:.2f} / "
                f"{summary[f'baseline-first-sentence-rougeL-{a}']:.2f} / {summary[f'baseline-last-sentence-rougeL-{a}']:.2f})"
                for a in aspects
            )
        )
