"""A launcher's watchdog: once the launcher is gone, however it ended (SIGKILL included), no
process it started runs on.

    python -m flhf_core.runs.watchdog LAUNCHER_PID

Started by ``flhf run`` and ``flhf loopback`` in a session of its own (Ctrl-C in the terminal,
or a signal to the launcher's group, does not reach it). Every half second it records the
launcher's descendants: the SuperLink, the SuperExecs, ``flwr-simulation``, Ray's processes, the
SuperNodes and ClientApps, whatever session each put itself in. The kernel's parent-death
signal reaches a process's direct children only, and a killed launcher's grandchildren are
re-parented away from it, so the watchdog keeps the list while the tree is whole. When the
launcher is gone it kills each recorded process that is still the same process (same start
time), then exits. Linux only (``/proc``); elsewhere it exits at once. Standard library only:
it starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

POLL_SECONDS = 0.5


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process (empty where there is no /proc)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (name) ": the name may hold spaces
        table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def descendants(root: int, table: dict[int, tuple[int, str]]) -> dict[int, str]:
    """Every process below ``root`` in ``table``, with its start time."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = {}, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found[pid] = table[pid][1]
        stack.extend(children.get(pid, []))
    return found


def kill_recorded(recorded: dict[int, str]) -> list[int]:
    """SIGKILL each recorded process that is still the same one (its start time); the pids killed."""
    table = process_table()
    killed = []
    for pid, started in recorded.items():
        if pid == os.getpid() or table.get(pid, (0, ""))[1] != started:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def watch(launcher: int) -> list[int]:
    """Record ``launcher``'s descendants until it is gone, then kill them; the pids killed."""
    recorded: dict[int, str] = {}
    table = process_table()
    if launcher not in table:
        return []
    started = table[launcher][1]
    while launcher in table and table[launcher][1] == started:
        recorded.update(descendants(launcher, table))
        time.sleep(POLL_SECONDS)
        table = process_table()
    return kill_recorded(recorded)


def start(launcher: int | None = None) -> None:
    """Start a watchdog over ``launcher`` (this process by default), in a session of its own."""
    import subprocess

    if not Path("/proc/self/stat").exists():
        return
    subprocess.Popen(
        [sys.executable, "-m", "flhf_core.runs.watchdog", str(launcher or os.getpid())],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]))
