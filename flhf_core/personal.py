"""A user's personal parameters: kept in Flower's ``Context.state`` and on the user's disk.

``Context.state`` survives rounds but lives in the SuperNode's memory only; so the client
also writes its personal parameters to its own state directory (safetensors, atomically),
from which a restarted SuperNode, or ``flhf summarize --user``, picks them up. A file that
cannot be read is reported and kept (copied to ``*.corrupt`` before it is replaced); the
user then starts fresh.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .config import RunConfig

STATE_RECORD = "personal"  # ArrayRecord in Context.state
STATE_INFO = "personal-info"  # ConfigRecord in Context.state
STATE_FILE = "personal.safetensors"

log = logging.getLogger("flwr")


def state_dir(context: Context, config: RunConfig, run_name: str, user: int) -> Path:
    """Where user ``user`` keeps its state for the run named ``run_name``.

    ``<state-dir>/<run-name>/user-<k>`` with the node config's ``state-dir`` (deployment:
    the user's own disk), or in simulation, where nodes have no such key,
    ``<results-dir>/<run-name>/users/user-<k>``.
    """
    root = context.node_config.get("state-dir")
    if root:
        return Path(str(root)).expanduser().resolve() / run_name / f"user-{user}"
    return config.results_path / run_name / "users" / f"user-{user}"


@dataclass
class Restored:
    record: ArrayRecord | None  # None: start fresh
    source: str  # "context", "file" or "fresh"
    problem: str = ""  # why a file could not be used


def restore(context: Context, folder: Path, mode: str, names: frozenset[str]) -> Restored:
    """The user's personal parameters: from Context.state, else its state file, else none."""
    if STATE_RECORD in context.state.array_records:
        return Restored(context.state.array_records[STATE_RECORD], "context")
    path = folder / STATE_FILE
    if not path.exists():
        return Restored(None, "fresh")
    try:
        arrays = load_file(str(path))
        metadata = _metadata(path)
    except (SafetensorError, OSError, ValueError) as error:
        problem = f"personal state {path} is unreadable ({error}); it is kept, and the user starts fresh"
        log.error(problem)
        return Restored(None, "fresh", problem)
    if metadata.get("personalization") != mode or set(arrays) != set(names):
        problem = (
            f"personal state {path} holds {metadata.get('personalization')!r} parameters that do not fit this "
            f"run ({mode!r}); it is kept, and the user starts fresh"
        )
        log.error(problem)
        return Restored(None, "fresh", problem)
    return Restored(ArrayRecord({k: Array(v) for k, v in sorted(arrays.items())}), "file")


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def persist(context: Context, folder: Path, record: ArrayRecord, mode: str, server_round: int) -> Path:
    """Keep ``record`` in Context.state and write it to ``folder`` atomically."""
    context.state[STATE_RECORD] = record
    context.state[STATE_INFO] = ConfigRecord({"personalization": mode, "round": server_round})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STATE_FILE
    if path.exists() and not _readable(path):
        shutil.copyfile(path, path.with_name(path.name + ".corrupt"))  # keep the evidence
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".personal.", suffix=".tmp")
    os.close(fd)
    try:
        arrays = {k: np.ascontiguousarray(v.numpy()) for k, v in record.items()}
        save_file(arrays, tmp, metadata={"personalization": mode, "round": str(server_round)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _readable(path: Path) -> bool:
    try:
        load_file(str(path))
        return True
    except (SafetensorError, OSError, ValueError):
        return False


def load_into(model: torch.nn.Module, path: Path) -> str:
    """Load a personal state file into ``model`` (for ``flhf summarize --user``); its mode."""
    from .model import record_to_parameters

    arrays = load_file(str(path))
    record_to_parameters(model, ArrayRecord({k: Array(v) for k, v in arrays.items()}), names=set(arrays))
    return _metadata(path).get("personalization", "")
