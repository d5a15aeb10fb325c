"""Aggregation math as pure functions: client weights and the weighted average.

FedAvg (McMahan et al., 2017) averages client parameters with weights
proportional to their number of training examples:

    theta = sum_k w_k * theta_k,   w_k = n_k / sum_j n_j

``reward-weighting = "none"`` is exactly that. The reward-aware modes fold a
per-client reward into w_k (see :func:`client_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def client_weights(num_examples: Sequence[float], mode: str = "none") -> list[float]:
    """Normalized aggregation weights, one per client, summing to 1.

    ``mode="none"``: w_k = n_k / sum_j n_j (FedAvg).
    """
    if not num_examples:
        raise ValueError("no clients to weight")
    if any(not math.isfinite(n) or n <= 0 for n in num_examples):
        raise ValueError(f"num-examples must be positive and finite, got {list(num_examples)}")
    if mode != "none":
        raise ValueError(f"unknown reward weighting {mode!r}")
    total = float(sum(num_examples))
    return [n / total for n in num_examples]


def weighted_average(
    arrays: Sequence[dict[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """sum_k weights[k] * arrays[k], key by key, accumulated in client order.

    The accumulation order and arithmetic follow Flower's FedAvg
    (``value * weight`` summed in reply order) so that equal weights give
    bit-identical results.
    """
    if len(arrays) != len(weights) or not arrays:
        raise ValueError(f"{len(arrays)} parameter sets for {len(weights)} weights")
    keys = list(arrays[0])
    for index, client in enumerate(arrays[1:], start=1):
        if list(client) != keys:
            raise ValueError(f"client {index} sends different parameter names than client 0")
    average: dict[str, np.ndarray] = {}
    for client, weight in zip(arrays, weights, strict=True):
        for key in keys:
            if key in average:
                average[key] += client[key] * weight
            else:
                average[key] = client[key] * weight
    return average
