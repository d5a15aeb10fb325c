"""A user's learned reward model and judgements across rounds (every ``reward-model`` mode).

Kept as personal parameters are (:mod:`flhf_core.client.personal`): in Flower's ``Context.state``
(memory, survives rounds) and in the user's state folder, one safetensors file whose
metadata holds the judgements, the round and the parameters' layout
(:data:`~flhf_core.learning.reward_model.FORMAT`), written atomically: parameters and judgements
never disagree. For a resume, the user also keeps the older versions a replayed round may
need, and a round reads the newest version from before it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from transformers import PreTrainedModel

from flhf_core.learning.model import parameters_to_record, record_to_parameters
from flhf_core.learning.reward_model import FORMAT, Judgements, RewardModel, new_reward_model

STATE_RECORD = "reward-model"  # ArrayRecord in Context.state
JUDGEMENTS_RECORD = "reward-judgements"  # ConfigRecord in Context.state (with the round)
STATE_FILE = "reward-model.safetensors"  # parameters, with the judgements and round as metadata
VERSION_FILE = "reward-model.round-{round}.safetensors"  # older rounds a resume may go back to

log = logging.getLogger("flwr")


NO_CLUSTER = -1  # Judgements.checked_cluster = None, in a record that holds no None


def judgements_to_mapping(judgements: Judgements) -> dict[str, list | int]:
    return {
        "rated-documents": [d for d, _, _ in judgements.rated],
        "rated-summaries": [s for _, s, _ in judgements.rated],
        "ratings": [float(r) for _, _, r in judgements.rated],
        "chosen-documents": [d for d, _, _ in judgements.chosen],
        "winners": [w for _, w, _ in judgements.chosen],
        "losers": [lo for _, _, lo in judgements.chosen],
        "checks": [float(c) for c in judgements.checks],
        "checked-cluster": NO_CLUSTER if judgements.checked_cluster is None else judgements.checked_cluster,
    }


def judgements_from_mapping(mapping) -> Judgements:
    cluster = int(mapping.get("checked-cluster", NO_CLUSTER))
    return Judgements(
        rated=list(
            zip(
                mapping["rated-documents"],
                mapping["rated-summaries"],
                map(float, mapping["ratings"]),
                strict=True,
            )
        ),
        chosen=list(zip(mapping["chosen-documents"], mapping["winners"], mapping["losers"], strict=True)),
        checks=list(map(float, mapping.get("checks", []))),  # none kept before the gate existed
        checked_cluster=None if cluster == NO_CLUSTER else cluster,
    )


def _read(path: Path) -> tuple[int, dict[str, np.ndarray], Judgements]:
    """A saved file's round, parameters and judgements (raises if it cannot be read)."""
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
        arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return int(metadata["round"]), arrays, judgements_from_mapping(json.loads(metadata["judgements"]))


def saved_rounds(folder: Path) -> dict[int, Path]:
    """The user's saved reward models by the round that wrote them (the latest file and the
    older versions kept for a resume); an unreadable file is left out."""
    found = {}
    for path in folder.glob("reward-model*.safetensors"):
        try:
            with safe_open(str(path), framework="numpy") as handle:
                found[int((handle.metadata() or {})["round"])] = path
        except (OSError, ValueError, KeyError, SafetensorError):
            continue
    return found


def keep(
    context: Context,
    folder: Path,
    model: RewardModel,
    judgements: Judgements,
    server_round: int,
    window: int = 1,
) -> Path:
    """The user's reward model and judgements after ``server_round``: in Context.state, and in
    one file of ``folder`` (written atomically: parameters and judgements never disagree).
    As personal parameters do (:mod:`flhf_core.client.personal`), the user keeps the older versions a
    resume may replay from (``window``: the checkpoint interval) and drops those of rounds
    being replayed."""
    from flhf_core.client.personal import versions_to_keep

    record = parameters_to_record(model)
    mapping = judgements_to_mapping(judgements)
    context.state[STATE_RECORD] = record
    context.state[JUDGEMENTS_RECORD] = ConfigRecord({**mapping, "round": server_round})
    folder.mkdir(parents=True, exist_ok=True)
    saved = saved_rounds(folder)
    for old_round, old_path in saved.items():  # the latest becomes a version; a replayed round's goes
        if old_round >= server_round:
            old_path.unlink()
        elif old_path.name == STATE_FILE:
            old_path.rename(folder / VERSION_FILE.format(round=old_round))
    saved = {r: folder / VERSION_FILE.format(round=r) for r in saved if r < server_round}
    for old_round in set(saved) - versions_to_keep(saved, server_round, window):
        saved[old_round].unlink(missing_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as handle:
        temporary = Path(handle.name)
    metadata = {"judgements": json.dumps(mapping), "round": str(server_round), "format": str(FORMAT)}
    save_file({name: array.numpy() for name, array in record.items()}, str(temporary), metadata=metadata)
    os.replace(temporary, folder / STATE_FILE)
    return folder / STATE_FILE


def restore(
    context: Context,
    folder: Path,
    summarizer: PreTrainedModel,
    server_round: int,
    encoder: str = "summarizer",
) -> tuple[RewardModel, Judgements]:
    """The user's reward model and judgements from before ``server_round``: from Context.state,
    else the newest of ``folder``'s files from an earlier round (a replayed round must not see
    what its killed first attempt left), else a new reward model (the received summarizer's
    encoder, or the sentence encoder: ``encoder``; an indifferent head) with no judgements. A file that cannot be used is reported
    and kept as ``*.corrupt`` (the first such copy is kept), and the user starts again: an
    older version is never silently taken in place of the latest (as with personal state)."""
    model = new_reward_model(encoder, summarizer)  # reward-model-encoder
    saved = context.state.config_records.get(JUDGEMENTS_RECORD)
    if (
        saved is not None
        and STATE_RECORD in context.state.array_records
        and int(saved["round"]) < server_round
    ):
        record_to_parameters(model, context.state.array_records[STATE_RECORD])
        return model, judgements_from_mapping(saved)
    rounds = saved_rounds(folder)
    latest = folder / STATE_FILE
    if latest.is_file() and latest not in rounds.values():
        _set_aside(latest, "cannot be read")
        return model, Judgements([], [])
    earlier = sorted((r, p) for r, p in rounds.items() if r < server_round)
    if earlier:
        path = earlier[-1][1]
        try:
            _, arrays, judgements = _read(path)
            # checked whole before anything is written: a misfit leaves the new model as it was
            record_to_parameters(model, ArrayRecord({k: Array(v) for k, v in arrays.items()}))
            return model, judgements
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            _set_aside(path, f"cannot be used ({error})")
    return model, Judgements([], [])


def _set_aside(path: Path, problem: str) -> None:
    evidence = path.with_name(path.name + ".corrupt")
    if not evidence.exists():
        shutil.copyfile(path, evidence)
    log.error("reward model %s %s: kept as %s, the user starts again", path, problem, evidence.name)
