"""Checkpoints and exact resume: ``<run>/checkpoints/latest/``.

Every ``checkpoint-every`` rounds (and after the last) the server writes, in a folder swap
(a new folder renamed into place; a kill between the two renames leaves the previous one as
``.latest.old``, which :func:`load_checkpoint` then reads):

* ``model.safetensors`` + ``config.json`` + the tokenizer: the global model after the round
  (``save_pretrained``);
* ``metrics.jsonl``: the run's rows so far (rows of the checkpoint's round itself are not
  among them yet: they wait for the next round's replies, which carry the users' evaluation);
* ``state.json``: the round, the round still waiting for its evaluation (its server row and
  the users' training figures), the latest evaluated round, the round-0 figures, the number
  of users, the server's RNG states (Python, NumPy, torch), the run config, and the sha256 of
  the two files above (a corrupt checkpoint is refused, never half-used); for the record also
  the learning rate the next round uses and the failures so far (both follow from the config
  and the rows);
* ``strategy.safetensors`` (only when the strategy keeps arrays across rounds: the shared
  reward models of ``reward-model = federated | clustered``), also under a sha256.

What makes a resumed run equal an uninterrupted one: everything random is keyed by the seed
and the round (users' sampling, their shuffling, dropout and sampled summaries), the global
model is saved bit for bit, and the server's RNGs are restored. What resume means for
personal states: they live on the users' devices (:mod:`flhf_core.client.personal`), which keep the
versions a resume may need and read the newest one older than the round being replayed.

:func:`check_resumable` decides which config changes a resume accepts
(:data:`flhf_core.config.RESUMABLE_KEYS`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from flhf_core.common import atomic_write_text, save_folder_atomically
from flhf_core.config import RESUMABLE_KEYS, ConfigError, RunConfig
from flhf_core.learning.algorithms import OBJECTIVE_VERSIONS
from flhf_core.learning.model import tokenizer_fingerprint
from flhf_core.learning.reward_model import FORMAT as REWARD_MODEL_FORMAT
from flhf_core.results.rounds import Rejection, RoundReport
from flhf_core.results.tracking import read_metrics

LATEST = Path("checkpoints") / "latest"
STATE_FILE = "state.json"
STRATEGY_ARRAYS = "strategy.safetensors"
FORMAT = 1


class CheckpointError(ConfigError):
    """A run cannot be resumed: no checkpoint, a corrupt one, or a config that changes the experiment."""


@dataclass
class PendingRound:
    """A round whose rows wait for its model's evaluation (the next round's training replies,
    or the final evaluate messages carry it)."""

    server_round: int
    phase: str
    row: dict[str, float]  # the server row so far
    train: RoundReport


@dataclass
class Checkpoint:
    """What a resumed federation needs, read back and checked."""

    folder: Path
    server_round: int  # the last round whose global model is saved
    config: dict[str, Any]
    pending: PendingRound | None
    evaluated: tuple[int, dict[str, float]] | None
    initial: dict[str, float]
    failures: int
    num_users: int  # the federation's users (every node's num-partitions): a resume must have as many
    resumed_after: list[int]  # the rounds earlier resumes of this run went on from
    rng: dict[str, Any]
    rows: list[dict]
    tokenizer_sha256: str | None = None  # the vocabulary of its weights (None: saved before it was kept)
    strategy_state: dict[str, Any] = field(default_factory=dict)  # what the strategy carries across rounds
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # ... and its arrays


# --------------------------------------------------------------------------
# RNG states as JSON
# --------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The server process's Python, NumPy and torch RNG states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------
def _report_to_json(report: RoundReport) -> dict[str, Any]:
    return asdict(report)


def _report_from_json(data: Mapping[str, Any]) -> RoundReport:
    return RoundReport(
        server_round=int(data["server_round"]),
        phase=str(data["phase"]),
        sampled_nodes=[int(n) for n in data["sampled_nodes"]],
        user_metrics={int(u): dict(m) for u, m in data["user_metrics"].items()},
        weights={int(u): float(w) for u, w in data["weights"].items()},
        rejected=[Rejection(**r) for r in data["rejected"]],
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    server_round: int,
    config: Mapping[str, Any],
    pending: PendingRound | None,
    evaluated: tuple[int, Mapping[str, float]] | None,
    initial: Mapping[str, float],
    next_learning_rate: float,
    failures: int,
    num_users: int,
    resumed_after: list[int],
    strategy_state: Mapping[str, Any] | None = None,
    strategy_arrays: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``checkpoints/latest`` for the state after ``server_round`` (atomically)."""

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        shutil.copyfile(run_dir / "metrics.jsonl", folder / "metrics.jsonl")
        digests = {}
        if strategy_arrays:
            from safetensors.numpy import save_file

            save_file(
                {k: np.ascontiguousarray(v) for k, v in strategy_arrays.items()}, folder / STRATEGY_ARRAYS
            )
            digests[STRATEGY_ARRAYS] = sha256_file(folder / STRATEGY_ARRAYS)
        state = {
            "format": FORMAT,
            "reward-model-format": REWARD_MODEL_FORMAT,
            "tokenizer-sha256": tokenizer_fingerprint(tokenizer),  # the vocabulary the weights use
            "objective": OBJECTIVE_VERSIONS[config.get("feedback-algorithm", "sft")],
            "round": server_round,
            "next-learning-rate": next_learning_rate,  # the schedule's position
            "failures": failures,
            "num-users": num_users,
            "resumed-after": list(resumed_after),
            "pending": None
            if pending is None
            else {
                "server_round": pending.server_round,
                "phase": pending.phase,
                "row": pending.row,
                "train": _report_to_json(pending.train),
            },
            "evaluated": None if evaluated is None else [evaluated[0], dict(evaluated[1])],
            "initial": dict(initial),
            "strategy": dict(strategy_state or {}),
            "rng": rng_state(),
            "config": dict(config),
            "sha256": {
                "model.safetensors": sha256_file(folder / "model.safetensors"),
                "metrics.jsonl": sha256_file(folder / "metrics.jsonl"),
                **digests,
            },
        }
        # json, not atomic_write_json: NaN must survive (a row may hold one) and the folder swap is atomic
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        (folder / "round.txt").write_text(f"{server_round}\n")

    folder = run_dir / LATEST
    save_folder_atomically(folder, save)
    return folder


# --------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------
def check_resumable(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    """Raise naming every key whose value differs and that defines the experiment."""
    saved_config = RunConfig.from_saved(saved).to_mapping()
    differ = sorted(
        key
        for key, value in RunConfig.from_mapping(wanted).to_mapping().items()
        if key not in RESUMABLE_KEYS and saved_config.get(key) != value
    )
    if differ:
        changes = "; ".join(
            f"{k}: {saved_config.get(k)!r} in the checkpoint, {wanted.get(k)!r} now" for k in differ
        )
        raise CheckpointError(
            f"cannot resume: {changes}. These keys define the experiment; a resume may change only "
            f"{', '.join(sorted(RESUMABLE_KEYS - {'resume'}))}. Start a new run instead."
        )


def check_tokenizer(saved_sha256: str | None, current_sha256: str) -> None:
    """Refuse to put weights under another vocabulary than theirs: two tokenizers of one size
    load the same weights without an error, and every token id changes meaning. (A checkpoint
    from before the hash was kept has ``None`` and is not checked.)"""
    if saved_sha256 is not None and saved_sha256 != current_sha256:
        raise CheckpointError(
            f"cannot resume: the checkpoint's weights use the tokenizer {saved_sha256[:12]}, this run's is "
            f"{current_sha256[:12]} (a rebuilt shipped tokenizer, or another one trained). Resume with the "
            "FLHF that started the run, or start a new run."
        )


def check_reward_model_format(state: Mapping[str, Any]) -> None:
    """Refuse a run whose users saved reward models of another layout: the users' files would
    not load, and each user would go on without the judgements it gave (its file set aside as
    unreadable). A checkpoint from before the marker has layout 2 if its config has the key
    that came with layout 2 (``reward-model-length-learning-rate``), else 1."""
    before_marker = 2 if "reward-model-length-learning-rate" in state["config"] else 1
    saved = state.get("reward-model-format", before_marker)
    if state["config"].get("reward-model", "none") != "none" and saved != REWARD_MODEL_FORMAT:
        raise CheckpointError(
            f"cannot resume: the users' reward models were saved in layout {saved}, this FLHF "
            f"reads layout {REWARD_MODEL_FORMAT} (flhf_core.learning.reward_model.FORMAT). Resume with the "
            "FLHF that started the run, or start a new run."
        )


# The objectives checkpoints written before the "objective" key (commit 649fe00) were made
# under: version 2 of ppo and reinforce came (55d71c0) just before "reward-model-format", so a
# checkpoint with that marker and without "objective" has them at 2. Fixed, unlike
# OBJECTIVE_VERSIONS: a later bump must not change what those old checkpoints meant.
_OBJECTIVE_WITH_LAYOUT_MARKER = {"ppo": 2, "reinforce": 2}


def check_objective_version(state: Mapping[str, Any]) -> None:
    """Refuse a run whose feedback algorithm's loss has changed since it was checkpointed
    (:data:`flhf_core.learning.algorithms.OBJECTIVE_VERSIONS`): its later rounds would optimize another
    objective than its first, silently, and its figures would belong to neither. A run
    checkpointed before its first feedback round has optimized nothing yet and may resume; an
    unknown algorithm is left to the config's validation, which names what is allowed."""
    config = state["config"]
    algorithm = config.get("feedback-algorithm", "sft")
    if algorithm not in OBJECTIVE_VERSIONS or int(state["round"]) <= int(config.get("sft-rounds", 0)):
        return
    before_marker = _OBJECTIVE_WITH_LAYOUT_MARKER.get(algorithm, 1) if "reward-model-format" in state else 1
    saved = state.get("objective", before_marker)
    if saved != OBJECTIVE_VERSIONS[algorithm]:
        raise CheckpointError(
            f"cannot resume: the run's {algorithm} rounds optimized objective version {saved}, this "
            f"FLHF's {algorithm} optimizes version {OBJECTIVE_VERSIONS[algorithm]} "
            "(flhf_core.learning.algorithms.OBJECTIVE_VERSIONS). Resume with the FLHF that started the run, "
            "or start a new run."
        )


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read and verify ``run_dir``'s latest checkpoint; raise :class:`CheckpointError` if unusable.

    A run killed in the middle of replacing ``latest`` (between its two renames) left the
    previous checkpoint as ``.latest.old``: that one is used then."""
    folder = run_dir / LATEST
    previous = folder.with_name(f".{folder.name}.old")
    if not (folder / STATE_FILE).is_file() and (previous / STATE_FILE).is_file():
        folder = previous
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not an FLHF run folder (no config.json).")
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(
            f"{run_dir} has no checkpoint to resume from ({LATEST / STATE_FILE} is missing)."
        )
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        if state.get("format") != FORMAT:
            raise ValueError(f"format {state.get('format')!r}, this FLHF reads {FORMAT}")
        for name, digest in state["sha256"].items():
            if sha256_file(folder / name) != digest:
                raise ValueError(f"{name} does not match its sha256 (changed or truncated)")
        pending = state["pending"]
        checkpoint = Checkpoint(
            folder=folder,
            server_round=int(state["round"]),
            config=dict(state["config"]),
            tokenizer_sha256=state.get("tokenizer-sha256"),
            pending=None
            if pending is None
            else PendingRound(
                int(pending["server_round"]),
                str(pending["phase"]),
                dict(pending["row"]),
                _report_from_json(pending["train"]),
            ),
            evaluated=None
            if state["evaluated"] is None
            else (int(state["evaluated"][0]), state["evaluated"][1]),
            initial=dict(state["initial"]),
            failures=int(state["failures"]),
            num_users=int(state["num-users"]),
            resumed_after=[int(r) for r in state["resumed-after"]],
            rng=state["rng"],
            rows=read_metrics(folder / "metrics.jsonl"),
            strategy_state=dict(state.get("strategy", {})),
            strategy_arrays=_strategy_arrays(folder) if STRATEGY_ARRAYS in state["sha256"] else {},
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError) as error:
        raise CheckpointError(
            f"the checkpoint {folder} is corrupt: {type(error).__name__}: {error}"
        ) from None
    check_reward_model_format(state)
    check_objective_version(state)
    return checkpoint


def _strategy_arrays(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / STRATEGY_ARRAYS))


def restore_metrics(run_dir: Path, checkpoint: Checkpoint) -> int:
    """Rewrite ``metrics.jsonl`` as it was at the checkpoint (rows the killed run wrote after it
    will be written again); return the round of the first row still to come. The file as the
    killed (or finished) run left it is kept as ``metrics.before-resume.jsonl``."""
    current = run_dir / "metrics.jsonl"
    if current.is_file():
        atomic_write_text(run_dir / "metrics.before-resume.jsonl", current.read_text())
    atomic_write_text(current, (checkpoint.folder / "metrics.jsonl").read_text())
    last = max((row["round"] for row in checkpoint.rows), default=-1)
    return last + 1


def load_model_into(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """The checkpoint's global model into ``model`` (same architecture, every tensor)."""
    from flhf_core.learning.model import load_pretrained

    try:
        saved = load_pretrained(checkpoint.folder)
        model.load_state_dict(saved.state_dict(), strict=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"the checkpoint {checkpoint.folder} has an unusable model: {error}") from None
