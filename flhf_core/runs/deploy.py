"""A real Flower deployment on loopback: one SuperLink and N SuperNodes as OS processes.

Each server starts in its own session (``start_new_session``), so stopping its process
group also stops the ``flower-superexec`` children it spawned, which otherwise outlive
their parent by seconds. Everything is stopped on success, failure and interrupt.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flhf_core.runs import credentials

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
    """The environment for Flower processes: no per-run dependency installation, our PATH,
    no colours (a Jupyter kernel sets FORCE_COLOR, which makes ``flwr run --format json``
    print ANSI codes inside its JSON), and a matplotlib backend that needs no notebook."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE")}
    if inherited.get("MPLBACKEND", "").startswith("module://"):  # e.g. matplotlib_inline's
        inherited["MPLBACKEND"] = "Agg"
    return {
        **inherited,
        "NO_COLOR": "1",
        # Flower would otherwise build a fresh environment per run (and fetch CUDA torch).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # How often a SuperExec asks for a task to launch (a ClientApp per message in
        # deployment): Flower's default, 1 s, adds up to a second to every message.
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
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
        process.poll()  # reap the leader: a zombie still counts as a member of its group
        try:
            os.killpg(process.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def write_connection(
    flwr_home: Path, port: int, security: str = "insecure = true", host: str = "127.0.0.1"
) -> None:
    """A private ``FLWR_HOME`` whose default ``flwr`` connection is the SuperLink on ``host:port``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{host}:{port}"\n{security}\n'
    )


def spawn_logged(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``command`` in its own session, logging to ``log_path`` (its command line first)."""
    log = log_path.open("ab")
    log.write(f"$ {shlex.join(command)}\n".encode())
    log.flush()
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def listening_pids(port: int) -> set[int] | None:
    """The processes with a socket listening on TCP ``port`` (Linux ``/proc``; None elsewhere)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None if not Path("/proc/net/tcp").exists() else set()
    pids = set()
    for fds in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in fds.iterdir()):
                pids.add(int(fds.parent.name))
    return pids


def owns_port(process: subprocess.Popen, port: int) -> bool:
    """Whether the process listening on ``port`` is ``process`` or one of its process group
    (where that cannot be told, as off Linux, whether the port answers at all)."""
    pids = listening_pids(port)
    if pids is None:
        return True
    group = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == process.pid:
                group.add(pid)
    return bool(group)


def wait_for_port(
    process: subprocess.Popen, port: int, name: str, log_dir: Path, timeout: float = 60.0
) -> None:
    """Wait until ``process`` listens on 127.0.0.1:``port``; raise if it exits or times out, or if
    what answers there is another process (the port was taken between choosing and binding it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {log_dir}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                if owns_port(process, port):
                    return
                time.sleep(1.0)  # our server may still be binding: it exits if the port is taken
                if process.poll() is None and owns_port(process, port):
                    return
                raise RuntimeError(
                    f"127.0.0.1:{port} answers, but not the {name} this launcher started (pid "
                    f"{process.pid}): another process holds the port; see {log_dir}"
                )
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


@dataclass
class LocalSimulation:
    """A simulation SuperLink owned by one ``flhf run``: its own free port and private ``FLWR_HOME``.

    ``flwr run`` would otherwise share one local SuperLink (a fixed port, ``~/.flwr``)
    between all runs on the machine, and the first launcher to stop it would kill the
    others' runs. Each launcher starts its own, stops exactly it, and can tell whether it
    is still alive.
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    @property
    def log_path(self) -> Path:
        return self.workdir / "superlink.log"

    def env(self) -> dict[str, str]:
        return flower_env(FLWR_HOME=str(self.flwr_home))

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> LocalSimulation:
        write_connection(self.flwr_home, self.port)
        command = [flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess"]
        command += [
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.process = spawn_logged(command, self.log_path, self.env())
        try:
            wait_for_port(self.process, self.port, "flower-superlink", self.workdir, timeout=30.0)
        except BaseException:
            stop_process_group(self.process)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            stop_process_group(self.process)
        stop_leftovers(self.port)


def stop_leftovers(port: int) -> list[int]:
    """Stop the process groups of Flower processes still talking to the SuperLink on ``port``.

    The SuperLink starts ``flower-superexec`` in a session of its own, which starts
    ``flwr-simulation`` (and Ray) or the apps in turn: if the SuperLink was killed rather
    than stopped, they run on as orphans, busy with a run nobody will collect. They are
    found by the SuperLink address on their command line (Linux ``/proc``). Returns their pids.
    """
    address = f"127.0.0.1:{port}"
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(address.encode() in arg for arg in argv) and any(
            b"flwr" in arg or b"flower" in arg for arg in argv[:2]
        ):
            found.append(int(proc.name))
    for pid in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    return found


def training_marker(workdir: Path, user: int) -> Path:
    """The file user ``user``'s ClientApp writes (the round number) when local training starts."""
    return workdir / f"training-{user}.marker"


@dataclass
class Loopback:
    """SuperLink + SuperNodes on 127.0.0.1, with logs and a private ``FLWR_HOME`` in ``workdir``.

    ``secure``: TLS everywhere (a CA, server certificate and node keys generated in
    ``workdir/credentials``) and SuperNode authentication: each SuperNode's public key is
    registered with ``flwr supernode register`` before it starts, and the SuperLink
    refuses any node it does not know.
    """

    workdir: Path
    users: int
    state_dir: Path
    secure: bool = False
    data_files: dict[int, Path] = field(default_factory=dict)  # users holding their own data file
    node_config: dict[int, str] = field(default_factory=dict)  # more node config of a user's SuperNode
    node_env: dict[int, dict[str, str]] = field(
        default_factory=dict
    )  # more environment of a user's SuperNode
    # Flower 1.42 serves the Fleet, Control and Runtime APIs on one port
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    credentials: credentials.Credentials | None = None

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    def env(self) -> dict[str, str]:
        return flower_env(FLWR_HOME=str(self.flwr_home))

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``command`` in its own session, logging to ``workdir/<name>.log`` (command first)."""
        self.processes[name] = spawn_logged(
            command, self.workdir / f"{name}.log", {**self.env(), **(env or {})}
        )
        return self.processes[name]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.secure:
            self.credentials = credentials.generate(self.workdir / "credentials", self.users)
            security = f'root-certificates = "{self.credentials.ca_cert}"'
        else:
            security = "insecure = true"
        write_connection(self.flwr_home, self.port, security)
        wait_for_port(self.spawn("superlink", self.superlink_command()), self.port, "superlink", self.workdir)
        for user in range(self.users):
            if self.credentials is not None:
                self.register(self.credentials.public_key(user))
            self.start_supernode(user)

    def superlink_command(self) -> list[str]:
        command = [flower_bin("flower-superlink"), "--isolation", "subprocess"]
        if self.credentials is None:
            command += ["--insecure"]
        else:
            command += ["--ssl-ca-certfile", str(self.credentials.ca_cert)]
            command += ["--ssl-certfile", str(self.credentials.server_cert)]
            command += ["--ssl-keyfile", str(self.credentials.server_key), "--enable-supernode-auth"]
        command += ["--disable-runtime-dependency-installation"]
        return [*command, "--host", "127.0.0.1", "--port", str(self.port)]

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key with the SuperLink; returns its node id."""
        result = subprocess.run(
            [flower_bin("flwr"), "supernode", "register", str(public_key), CONNECTION, "--format", "json"],
            capture_output=True,
            text=True,
            env=self.env(),
            check=False,
        )
        try:
            return int(json.loads(result.stdout)["node-id"])
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(f"could not register {public_key}: {result.stdout}{result.stderr}") from None

    def node_security(self, user: int) -> list[str]:
        """How SuperNode ``user`` proves itself: nothing (insecure), or the CA and its own key."""
        if self.credentials is None:
            return ["--insecure"]
        return [
            "--root-certificates",
            str(self.credentials.ca_cert),
            "--auth-supernode-private-key",
            str(self.credentials.node_keys[user]),
        ]

    def supernode_command(self, user: int, security: list[str] | None = None) -> list[str]:
        """SuperNode ``user``'s command; ``security`` replaces its TLS/auth flags (tests of refusal)."""
        node_config = f'partition-id={user} num-partitions={self.users} state-dir="{self.state_dir}"'
        # the users share this machine's cores: each oversubscribed thread spins and slows all
        node_config += f" torch-threads={max(1, (os.cpu_count() or 1) // self.users)}"
        node_config += f' training-marker="{training_marker(self.workdir, user)}"'
        if user in self.data_files:
            node_config += f' data-file="{self.data_files[user].resolve()}"'
        if user in self.node_config:
            node_config += f" {self.node_config[user]}"
        command = [flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}"]
        command += self.node_security(user) if security is None else security
        command += ["--node-config", node_config, "--isolation", "subprocess"]
        return [*command, "--host", "127.0.0.1", "--port", str(free_port())]

    def start_supernode(self, user: int) -> subprocess.Popen:
        return self.spawn(f"supernode-{user}", self.supernode_command(user), self.node_env.get(user))

    def alive(self) -> bool:
        """Whether the SuperLink is still running."""
        return "superlink" in self.processes and self.processes["superlink"].poll() is None

    def stop(self) -> None:
        """Stop SuperNodes first, then the SuperLink; every process group entirely."""
        for name in sorted(self.processes, key=lambda n: n == "superlink"):
            stop_process_group(self.processes[name])
        stop_leftovers(self.port)

    def __enter__(self) -> Loopback:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
