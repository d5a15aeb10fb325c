"""A rogue user, for fault campaigns (``bench/faults.py``): replies forged in the ways a
misbehaving or malicious client could forge them, to show that the server's screening holds.

Off everywhere by default. A node misbehaves only when both are set:

* its node config's ``rogue``: ``forged``, ``nan``, ``dtype``, ``oversized``, ``garbage``,
  ``steal``, ``slow``, or ``cycle`` (round r takes the (r + ``rogue-offset``)-th of those, in
  that order);
* the environment variable ``FLHF_FAULT_INJECTION=1`` of its SuperNode's processes, which only
  the campaign sets. A deployment's node config alone can switch nothing on.

Each forged reply is logged to ``<state-dir>/faults.jsonl`` (the round, the user, the kind), so
the campaign can check that every one was rejected.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from flhf_core.protocol import ARRAYS, METRICS, USER_ID, USER_RECORD

ENABLE = "FLHF_FAULT_INJECTION"
ROGUE = "rogue"  # node config key
DELAY = "rogue-delay"  # node config: seconds a ``slow`` reply waits (past the round timeout)
OFFSET = "rogue-offset"  # node config: where ``cycle`` starts
KINDS = ("forged", "nan", "dtype", "oversized", "garbage", "steal", "slow")
# the reason code the server's screening must reject each kind with (flhf_core.results.rounds)
REJECTED_AS = {
    "forged": "shape",
    "nan": "non-finite",
    "dtype": "dtype",
    "oversized": "size",
    "garbage": "decode",
    "steal": "identity",
    "slow": "timeout",
}


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def _replace_first(arrays: ArrayRecord, make) -> ArrayRecord:
    """``arrays`` with its first array's bytes replaced by ``make(array)``'s, declaring the original
    shape and dtype."""
    items = dict(arrays.items())
    name = next(iter(items))
    original = items[name]
    items[name] = Array(dtype=original.dtype, shape=original.shape, stype=original.stype, data=make(original))
    return ArrayRecord(items)


def forge(reply: Message, kind: str, num_users: int) -> Message:
    """The reply with its content forged as ``kind`` says (``slow`` forges nothing)."""
    content = reply.content
    if kind == "steal":
        user = int(content[USER_RECORD][USER_ID])
        content[USER_RECORD][USER_ID] = (user + 1) % max(num_users, 2)
        content[METRICS]["num-examples"] = 1e9
        return reply
    if kind == "slow" or ARRAYS not in content.array_records:
        return reply
    forgers = {
        "forged": lambda a: _npy(np.zeros((1,), dtype=np.float32)),  # declares the real shape
        "nan": lambda a: _npy(np.full(a.shape, np.nan, dtype=np.float32)),
        # same shape and byte size, another dtype (a float64 copy would exceed the size check first)
        "dtype": lambda a: _npy(a.numpy().view(np.int32)),  # declares float32
        "oversized": lambda a: _npy(np.zeros(int(np.prod(a.shape)) * 64 + 1024, dtype=np.float32)),
        "garbage": lambda a: os.urandom(max(64, len(a.data))),
    }
    content[ARRAYS] = _replace_first(content[ARRAYS], forgers[kind])
    return reply


def misbehave(reply: Message, context: Context, server_round: int, user: int, num_users: int) -> Message:
    """What a rogue node does to its train reply; nothing, unless the node config and the
    environment both ask for it."""
    kind = str(context.node_config.get(ROGUE, ""))
    if not kind or os.environ.get(ENABLE) != "1":
        return reply
    if kind == "cycle":
        kind = KINDS[(server_round + int(context.node_config.get(OFFSET, 0))) % len(KINDS)]
    if kind not in KINDS:
        raise ValueError(f"node config {ROGUE}: {kind!r} is not one of {', '.join((*KINDS, 'cycle'))}")
    state = context.node_config.get("state-dir")
    if state:
        log = Path(str(state)) / "faults.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(
                json.dumps({"round": server_round, "user": user, "kind": kind, "time": time.time()}) + "\n"
            )
    if kind == "slow":
        time.sleep(float(context.node_config.get(DELAY, 60.0)))
    return forge(reply, kind, num_users)
