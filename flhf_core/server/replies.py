"""What the strategy reads from a reply: pure helpers.

A reply's parameters are checked against a *signature* (each array's name, shape and dtype),
and its figures are split into scalars (averaged into rows) and lists (per-document figures,
kept apart). What the round reports is :class:`flhf_core.results.rounds.RoundReport`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

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


def signature_problem(arrays: ArrayRecord, expected: Signature) -> str | None:
    """Why ``arrays`` cannot be averaged with parameters of signature ``expected``."""
    if set(arrays.keys()) != set(expected):
        missing = sorted(set(expected) - set(arrays.keys()))[:3]
        extra = sorted(set(arrays.keys()) - set(expected))[:3]
        return f"parameter names differ from the global model (missing {missing}, extra {extra})"
    for name, array in arrays.items():
        shape, dtype = tuple(array.shape), str(array.dtype)
        if (shape, dtype) != expected[name]:
            want_shape, want_dtype = expected[name]
            return f"parameter '{name}' is {dtype}{list(shape)}, the global model's {want_dtype}{list(want_shape)}"
    return None


def arrays_problem(arrays: ArrayRecord, expected: Signature, what: str = "parameter") -> str | None:
    """Why ``arrays`` cannot be averaged with arrays of signature ``expected``: another
    signature, or non-finite values (``what`` names them in the reason)."""
    problem = signature_problem(arrays, expected)
    if problem:
        return problem if what == "parameter" else f"{what}: {problem}"
    for key, array in arrays.items():
        if not np.isfinite(array.numpy()).all():
            return f"{what} '{key}' has non-finite values"
    return None


def majority_signature(replies: Iterable[Message], key: str) -> Signature | None:
    """The signature most valid replies' ``key`` ArrayRecords share (None: no reply has one):
    what to expect when nothing better is known."""
    candidates = [
        r.content.array_records[key] for r in replies if not r.has_error() and key in r.content.array_records
    ]
    if not candidates:
        return None
    votes = Counter(tuple(sorted(signature(a).items())) for a in candidates)
    return dict(votes.most_common(1)[0][0])


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
