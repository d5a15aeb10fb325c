"""What the strategy reads from a reply: pure helpers.

A reply's parameters are checked against a *signature* (each array's name, shape and dtype),
and its figures are split into scalars (averaged into rows) and lists (per-document figures,
kept apart). What the round reports is :class:`flhf_core.results.rounds.RoundReport`.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from flhf_core.protocol import EVALUATION, METRICS

# What identifies a set of parameters: each array's name, shape and dtype.
Signature = dict[str, tuple[tuple[int, ...], str]]


def signature(arrays: ArrayRecord) -> Signature:
    return {name: (tuple(array.shape), str(array.dtype)) for name, array in arrays.items()}


def arrays_of(content: RecordDict, key: str) -> ArrayRecord:
    """A reply's model parameters: its ArrayRecord called ``key`` (any FedAvg client's only one)."""
    if key in content.array_records:
        return content.array_records[key]
    return next(iter(content.array_records.values()))


@dataclass(frozen=True)
class Problem:
    """Why a reply cannot count: a code of :data:`~flhf_core.results.rounds.REJECTION_CODES`
    and the reason in words."""

    code: str
    reason: str


NPY_HEADER_BYTES = 4096  # what a .npy file may hold beyond its array's own bytes (its header)


def decode_arrays(
    arrays: ArrayRecord, expected: Signature, what: str = "parameter"
) -> tuple[dict[str, np.ndarray], Problem | None]:
    """Decode ``arrays`` once, checking each against ``expected`` (the global model's
    signature) before and after: the names; the byte size, before decoding (no reply makes the
    server allocate more than the global model's array takes); the bytes' own shape and dtype,
    not only the ones the Array declares; finite values. The decoded arrays, or the problem.
    ``what`` names the arrays in the reason."""
    if set(arrays.keys()) != set(expected):
        missing = sorted(set(expected) - set(arrays.keys()))[:3]
        extra = sorted(set(arrays.keys()) - set(expected))[:3]
        return {}, Problem(
            "shape", f"{what} names differ from the global model's (missing {missing}, extra {extra})"
        )
    decoded = {}
    for name in expected:  # the global model's order, whatever order the reply used
        array = arrays[name]
        shape, dtype = expected[name]
        wanted = f"the global model's {dtype}{list(shape)}"
        try:
            capacity = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize + NPY_HEADER_BYTES
        except TypeError:  # an expected signature taken from replies may name no dtype
            return {}, Problem("dtype", f"{what} '{name}': {dtype!r} is no dtype")
        data = array.data
        if not isinstance(data, bytes) or len(data) > capacity:
            size = len(data) if isinstance(data, bytes) else type(data).__name__
            return {}, Problem(
                "size", f"{what} '{name}' holds {size} bytes, {wanted} takes at most {capacity}"
            )
        try:
            value = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as error:  # any malformed bytes, whatever numpy raises on them
            return {}, Problem("decode", f"{what} '{name}' does not decode: {type(error).__name__}: {error}")
        if not isinstance(value, np.ndarray):
            return {}, Problem("decode", f"{what} '{name}' does not decode to one array")
        declared = (tuple(array.shape), str(array.dtype))
        if value.shape != shape or declared[0] != shape:
            return {}, Problem(
                "shape", f"{what} '{name}' is {list(value.shape)} (declared {list(declared[0])}), {wanted}"
            )
        if str(value.dtype) != dtype or declared[1] != dtype:
            return {}, Problem(
                "dtype", f"{what} '{name}' is {value.dtype} (declared {declared[1]}), {wanted}"
            )
        if not np.isfinite(value).all():
            return {}, Problem("non-finite", f"{what} '{name}' has non-finite values")
        decoded[name] = value
    return decoded, None


def _well_formed(candidate: Signature) -> bool:
    try:
        return all(np.dtype(d) is not None and all(int(n) >= 0 for n in s) for s, d in candidate.values())
    except (TypeError, ValueError):
        return False


def majority_signature(replies: Iterable[Message], key: str) -> Signature | None:
    """The signature that more than half of the replies' ``key`` ArrayRecords declare (None when
    no signature has a strict majority): what to expect when nothing better is known. A tie, or
    a malformed declaration, sets nothing: one reply cannot decide what the others must be."""
    candidates = [
        signature(r.content.array_records[key])
        for r in replies
        if not r.has_error() and key in r.content.array_records
    ]
    votes = Counter(tuple(sorted(c.items())) for c in candidates if _well_formed(c))
    if not votes:
        return None
    winner, count = votes.most_common(1)[0]
    return dict(winner) if count * 2 > len(candidates) else None


def numpy_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in arrays.items()}


def own_metrics(content: RecordDict) -> MetricRecord | None:
    """A reply's own figures: its ``metrics`` record, else its only MetricRecord besides the
    evaluation of the received model (any Flower ClientApp's single record); None if ambiguous."""
    records = {name: r for name, r in content.metric_records.items() if name != EVALUATION}
    if METRICS in records:
        return records[METRICS]
    return next(iter(records.values())) if len(records) == 1 else None


def scalars(metrics: MetricRecord) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}


def lists(metrics: MetricRecord) -> dict[str, list[float]]:
    return {k: [float(x) for x in v] for k, v in metrics.items() if isinstance(v, list)}
