"""A user's personal parameters: kept in Flower's ``Context.state`` and on the user's disk.

``Context.state`` survives rounds but lives in the SuperNode's memory only; so the client
also writes its personal parameters to its own state directory (safetensors, atomically),
from which a restarted SuperNode, or ``flhf summarize --user``, picks them up. A file that
cannot be used (unreadable, or not fitting this run's model, or non-finite) is reported and
kept (copied to ``*.corrupt`` before it is replaced); the user then starts fresh.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
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


def restore(context: Context, folder: Path, mode: str, shapes: Mapping[str, tuple[int, ...]]) -> Restored:
    """The user's personal parameters: from Context.state, else its state file, else none.

    ``shapes`` are the personal parameters this run's model has. A state that does not fit
    them (other names, other shapes such as another ``lora-rank``, another mode) or holds
    non-finite values is reported, a file is kept as ``*.corrupt``, and the user starts fresh.
    """
    if STATE_RECORD in context.state.array_records:
        record = context.state.array_records[STATE_RECORD]
        problem = _misfit({k: v.numpy() for k, v in record.items()}, shapes)
        if not problem:
            return Restored(record, "context")
        problem = f"personal state in the node's memory {problem}; the user starts fresh"
        log.error(problem)
        return Restored(None, "fresh", problem)
    path = folder / STATE_FILE
    if not path.exists():
        return Restored(None, "fresh")
    try:
        arrays = load_file(str(path))
        metadata = _metadata(path)
    except (SafetensorError, OSError, ValueError) as error:
        return _reject_file(path, f"is unreadable ({error})")
    if metadata.get("personalization") != mode:
        return _reject_file(path, f"holds {metadata.get('personalization')!r} parameters, not {mode!r} ones")
    problem = _misfit(arrays, shapes)
    if problem:
        return _reject_file(path, problem)
    return Restored(ArrayRecord({k: Array(v) for k, v in sorted(arrays.items())}), "file")


def _misfit(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Why ``arrays`` cannot be this run's personal parameters ("" if they can)."""
    if set(arrays) != set(shapes):
        missing, extra = sorted(set(shapes) - set(arrays))[:3], sorted(set(arrays) - set(shapes))[:3]
        return f"does not fit this run's personal parameters (missing {missing}, extra {extra})"
    for name, array in sorted(arrays.items()):
        if tuple(array.shape) != tuple(shapes[name]):
            return (
                f"does not fit: {name} has shape {tuple(array.shape)}, this run's model {tuple(shapes[name])}"
            )
        if not np.isfinite(array).all():
            return f"holds non-finite values in {name}"
    return ""


def _reject_file(path: Path, problem: str) -> Restored:
    """Report a state file that cannot be used, keep a copy of it, and start fresh."""
    evidence = path.with_name(path.name + ".corrupt")
    if not evidence.exists():
        shutil.copyfile(path, evidence)
    message = f"personal state {path} {problem}; it is kept as {evidence.name}, and the user starts fresh"
    log.error(message)
    return Restored(None, "fresh", message)


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


def load_into(model: torch.nn.Module, path: Path) -> str:
    """Load a personal state file into ``model`` (for ``flhf summarize --user``); its mode."""
    from .model import record_to_parameters

    arrays = load_file(str(path))
    record_to_parameters(model, ArrayRecord({k: Array(v) for k, v in arrays.items()}), names=set(arrays))
    return _metadata(path).get("personalization", "")
