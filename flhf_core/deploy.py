"""A real Flower deployment on loopback: one SuperLink and N SuperNodes as OS processes.

Each server starts in its own session (``start_new_session``), so stopping its process
group also stops the ``flower-superexec`` children it spawned, which otherwise outlive
their parent by seconds. Everything is stopped on success, failure and interrupt.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CONNECTION = "flhf-loopback"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (it need not be activated)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def flower_env(**extra: str) -> dict[str, str]:
    """The environment for Flower processes: no per-run dependency installation, our PATH."""
    return {
        **os.environ,
        # Flower would otherwise build a fresh environment per run (and fetch CUDA torch).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # The SuperLink and SuperNodes spawn flower-superexec and flwr-* by name.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        **extra,
    }


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process's whole group, then SIGKILL whatever is left of it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@dataclass
class Loopback:
    """SuperLink + SuperNodes on 127.0.0.1, with logs and a private ``FLWR_HOME`` in ``workdir``."""

    workdir: Path
    users: int
    state_dir: Path
    port: int = field(
        default_factory=free_port
    )  # Flower 1.42 serves Fleet, Control and Runtime APIs on one port
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    def env(self) -> dict[str, str]:
        return flower_env(FLWR_HOME=str(self.flwr_home))

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env()
        )
        self.processes[name] = process
        return process

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self._spawn("superlink", self.superlink_command())
        self._wait_for_port(self.port, "superlink")
        for user in range(self.users):
            self.start_supernode(user)

    def superlink_command(self) -> list[str]:
        command = [flower_bin("flower-superlink"), "--insecure", "--isolation", "subprocess"]
        command += ["--disable-runtime-dependency-installation"]
        return [*command, "--host", "127.0.0.1", "--port", str(self.port)]

    def marker(self, user: int) -> Path:
        """The file user ``user``'s ClientApp touches when local training starts."""
        return self.workdir / f"training-{user}.marker"

    def supernode_command(self, user: int) -> list[str]:
        node_config = f'partition-id={user} num-partitions={self.users} state-dir="{self.state_dir}"'
        node_config += f' training-marker="{self.marker(user)}"'
        command = [
            flower_bin("flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{self.port}",
        ]
        command += ["--node-config", node_config, "--isolation", "subprocess"]
        return [*command, "--host", "127.0.0.1", "--port", str(free_port())]

    def start_supernode(self, user: int) -> subprocess.Popen:
        return self._spawn(f"supernode-{user}", self.supernode_command(user))

    def _wait_for_port(self, port: int, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {self.processes[name].returncode}; see {self.workdir}"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")

    def stop(self) -> None:
        """Stop SuperNodes first, then the SuperLink; every process group entirely."""
        for name in sorted(self.processes, key=lambda n: n == "superlink"):
            stop_process_group(self.processes[name])

    def __enter__(self) -> Loopback:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
