"""A user's personal parameters: kept in Flower's ``Context.state`` and on the user's disk.

``Context.state`` survives rounds but lives in the SuperNode's memory only; so the client
also writes its personal parameters to its own state directory (safetensors, atomically),
from which a restarted SuperNode, or ``flhf summarize --user``, picks them up. A file that
cannot be used (unreadable, or not fitting this run's model, or non-finite) is reported and
kept (copied to ``*.corrupt`` before it is replaced); the user then starts fresh.

Resume: the server may replay rounds after its last checkpoint (a killed run resumed with
``flhf run --resume``), so a user keeps, beside the latest state, the older versions such a
replay may need (``personal.round-<r>.safetensors``, see :func:`versions_to_keep`) and a
message of round r reads the newest version from before round r (a train message: the state
its previous training left; an evaluate message of round r's model: the state of round r).
A version from a round being replayed is dropped when the replay trains again.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from flhf_core.config import RunConfig

STATE_RECORD = "personal"  # ArrayRecord in Context.state
STATE_INFO = "personal-info"  # ConfigRecord in Context.state
STATE_FILE = "personal.safetensors"
VERSION_FILE = "personal.round-{round}.safetensors"

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


def restore(
    context: Context,
    folder: Path,
    mode: str,
    shapes: Mapping[str, tuple[int, ...]],
    before_round: int | None = None,
) -> Restored:
    """The user's personal parameters: from Context.state, else its state files, else none.

    ``before_round``: only a state written by an earlier round counts (a replayed round must
    not see the state its first, killed attempt left); None takes the latest.

    ``shapes`` are the personal parameters this run's model has. A state that does not fit
    them (other names, other shapes such as another ``lora-rank``, another mode) or holds
    non-finite values is reported, a file is kept as ``*.corrupt``, and the user starts fresh.
    """
    if STATE_RECORD in context.state.array_records and _earlier(_memory_round(context), before_round):
        record = context.state.array_records[STATE_RECORD]
        problem = _misfit({k: v.numpy() for k, v in record.items()}, shapes)
        if not problem:
            return Restored(record, "context")
        problem = f"personal state in the node's memory {problem}; the user starts fresh"
        log.error(problem)
        return Restored(None, "fresh", problem)
    saved = versions(folder)
    usable = [(r, p) for r, p in saved.items() if r is not None and _earlier(r, before_round)]
    if None in saved:  # an unreadable latest state is reported, never silently passed over
        path = saved[None]
    elif usable:
        path = max(usable)[1]
    else:
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


def _earlier(state_round: int | None, before_round: int | None) -> bool:
    return before_round is None or state_round is None or state_round < before_round


def _memory_round(context: Context) -> int | None:
    info = context.state.config_records.get(STATE_INFO)
    return None if info is None else int(info.get("round", 0))


def versions(folder: Path) -> dict[int | None, Path]:
    """The user's saved personal states by the round that wrote them (the latest file and the
    older versions kept for a resume). An unreadable latest file is listed under None (to be
    reported); an unreadable older version is left out (a replay needing it starts fresh)."""
    found: dict[int | None, Path] = {}
    for path in sorted(folder.glob("personal*.safetensors")):
        try:
            found[int(_metadata(path).get("round", "0"))] = path
        except (SafetensorError, OSError, ValueError):
            if path.name == STATE_FILE:
                found[None] = path
            else:
                log.warning("personal state version %s is unreadable; it is left out", path)
    return found


def versions_to_keep(rounds: Iterable[int], current: int, window: int) -> set[int]:
    """Which saved rounds a user keeps after writing round ``current``'s state.

    The server's latest checkpoint is at most ``window`` (``checkpoint-every``) rounds behind,
    at any round c in [current - window, current]; a resume from c needs the newest version
    from round c or before. So: every version after round ``current - window``, and the
    newest one from that round or before.
    """
    rounds = sorted(set(rounds))
    recent = {r for r in rounds if r > current - window}
    older = [r for r in rounds if r <= current - window]
    return recent | set(older[-1:])


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


def persist(
    context: Context, folder: Path, record: ArrayRecord, mode: str, server_round: int, window: int = 1
) -> Path:
    """Keep ``record`` in Context.state and write it to ``folder`` atomically, as the latest
    state; keep the older versions a resume may need (``window``: the checkpoint interval)."""
    context.state[STATE_RECORD] = record
    context.state[STATE_INFO] = ConfigRecord({"personalization": mode, "round": server_round})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STATE_FILE
    saved = {r: p for r, p in versions(folder).items() if r is not None}  # restore reported the rest
    for old_round, old_path in saved.items():  # the latest becomes a version; a replayed round's goes
        if old_round >= server_round:
            old_path.unlink()
        elif old_path.name == STATE_FILE:
            old_path.rename(folder / VERSION_FILE.format(round=old_round))
    saved = {r: folder / (VERSION_FILE.format(round=r)) for r in saved if r < server_round}
    for old_round in set(saved) - versions_to_keep(saved, server_round, window):
        saved[old_round].unlink(missing_ok=True)
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
    from flhf_core.learning.model import record_to_parameters

    arrays = load_file(str(path))
    record_to_parameters(model, ArrayRecord({k: Array(v) for k, v in arrays.items()}), names=set(arrays))
    return _metadata(path).get("personalization", "")
