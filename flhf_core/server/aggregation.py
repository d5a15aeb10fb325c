"""Aggregation math as pure functions: client weights and the weighted average.

FedAvg (McMahan et al., 2017) averages client parameters with weights
proportional to their number of training examples:

    theta = sum_k w_k * theta_k,   w_k = n_k / sum_j n_j

``reward-weighting = "none"`` is exactly that. The reward-aware modes fold a
per-client reward into w_k (see :func:`client_weights`), and :func:`cap_shares` keeps any
one client (say, one reporting an inflated reward) from dominating the average.

``qfedavg`` is q-FFL (Li et al., 2020, "Fair Resource Allocation in Federated Learning",
https://openreview.net/pdf?id=ByexElSYDr), as Flower's ``QFedAvg`` computes it: not a convex
combination of the clients but a step from the global model (:func:`qffl_shares`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def client_weights(
    num_examples: Sequence[float],
    mode: str = "none",
    rewards: Sequence[float] | None = None,
    rewards_before: Sequence[float] | None = None,
    temperature: float = 0.1,
    max_weight: float = 1.0,
) -> list[float]:
    """Normalized aggregation weights, one per client, summing to 1.

    With n_k examples, reward r_k in [0, 1] and reward before the round b_k:

    * ``none``:    w_k ∝ n_k                              (FedAvg)
    * ``linear``:  w_k ∝ n_k * r_k                        (all rewards 0: FedAvg)
    * ``softmax``: w_k ∝ n_k * exp(r_k / T)               (T < 0 favours the worst-served users)
    * ``gain``:    w_k ∝ n_k * max(r_k - b_k, 0)          (no positive gain: FedAvg)
    * ``history``: w_k ∝ n_k * exp(-r_k / |T|)            r_k: the user's reward *history*
      (the mean reward of the models it received so far, :func:`reward_history_means`): the
      users the federation has served worst weigh most, as in weighting by reward history
      (APPA, 2026); noise in one round's reward averages out.

    then no share exceeds ``max_weight`` (:func:`cap_shares`).
    """
    if not num_examples:
        raise ValueError("no clients to weight")
    if any(not math.isfinite(n) or n <= 0 for n in num_examples):
        raise ValueError(f"num-examples must be positive and finite, got {list(num_examples)}")
    counts = np.asarray(num_examples, dtype=np.float64)
    if mode == "none":
        raw = counts
    else:
        if rewards is None or len(rewards) != len(counts):
            raise ValueError(f"reward weighting {mode!r} needs one reward per client")
        r = np.asarray(rewards, dtype=np.float64)
        if mode == "linear":
            raw = counts * r
        elif mode == "softmax":
            logits = r / temperature
            raw = counts * np.exp(logits - logits.max())  # shifted: same shares, no overflow
        elif mode == "history":
            logits = -r / abs(temperature)
            raw = counts * np.exp(logits - logits.max())
        elif mode == "gain":
            if rewards_before is None or len(rewards_before) != len(counts):
                raise ValueError("reward weighting 'gain' needs the rewards before the round")
            raw = counts * np.maximum(r - np.asarray(rewards_before, dtype=np.float64), 0.0)
        else:
            raise ValueError(f"unknown reward weighting {mode!r}")
        if raw.sum() <= 0:  # nobody earned weight: fall back to FedAvg
            raw = counts
    return cap_shares((raw / raw.sum()).tolist(), max_weight)


def reward_history_means(history: dict[int, list[float]], users: Sequence[int]) -> list[float]:
    """Each user's mean received reward so far (its history must hold at least this round's)."""
    missing = [u for u in users if not history.get(u)]
    if missing:
        raise ValueError(f"no reward history for users {missing}")
    return [float(np.mean(history[u])) for u in users]


# qfedavg's loss F_k in FLHF's feedback rounds: 1 - the reply's reward-before (see FeedbackFedAvg)
REWARD_SHORTFALL = "reward-shortfall"


def qffl_shares(
    squared_distances: Sequence[float], losses: Sequence[float], q: float, learning_rate: float
) -> list[float]:
    """q-FFL's step as shares: ``theta_new = (1 - sum_k a_k) theta + sum_k a_k theta_k``.

    With global parameters w, client k's parameters w_k, its train loss F_k and the
    Lipschitz estimate L = 1 / learning_rate (Flower's choice), q-FFL takes

        Delta_k = F_k^q L (w - w_k)
        h_k     = q F_k^(q-1) L^2 ||w - w_k||^2 + L F_k^q
        w_new   = w - sum_k Delta_k / sum_k h_k

    so a_k = L F_k^q / sum_j h_j (``squared_distances[k]`` = ||w - w_k||^2). Users with a
    higher loss get more weight as q grows; q = 0 is the unweighted mean of the clients.
    The shares sum to at most 1: the rest stays on the global model.
    """
    if len(squared_distances) != len(losses) or not losses:
        raise ValueError(f"{len(squared_distances)} distances for {len(losses)} losses")
    if learning_rate <= 0 or q < 0:
        raise ValueError(f"q-FFL needs learning_rate > 0 and q >= 0, got {learning_rate} and {q}")
    if any(not math.isfinite(f) or f < 0 for f in losses):
        raise ValueError(f"q-FFL needs finite, non-negative train losses, got {list(losses)}")
    lipschitz = 1.0 / learning_rate
    loss = np.asarray(losses, dtype=np.float64) + 1e-10  # as Flower: a zero loss keeps a weight
    distance = np.asarray(squared_distances, dtype=np.float64)
    h = q * np.float_power(loss, q - 1) * lipschitz**2 * distance + lipschitz * np.float_power(loss, q)
    return (lipschitz * np.float_power(loss, q) / h.sum()).tolist()


def squared_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """||a - b||^2 over every parameter (float64 accumulation)."""
    return float(sum(np.sum(np.square(a[k].astype(np.float64) - b[k].astype(np.float64))) for k in a))


def cap_shares(shares: Sequence[float], max_share: float) -> list[float]:
    """Shares summing to 1 with none above ``max_share``, the excess spread proportionally.

    Water-filling: clip the largest shares to the cap and rescale the rest, until no
    share exceeds it. If the cap is below 1/n it cannot hold for n clients; the closest
    feasible answer, equal shares 1/n, is returned (one client alone always gets 1).
    """
    n = len(shares)
    if max_share * n <= 1.0:
        return [1.0 / n] * n
    result = np.asarray(shares, dtype=np.float64)
    capped = np.zeros(n, dtype=bool)
    while (result > max_share + 1e-12).any():
        capped |= result > max_share
        free = 1.0 - max_share * capped.sum()
        rest = result[~capped].sum()
        result = np.where(capped, max_share, result * free / rest if rest > 0 else free / (~capped).sum())
    return result.tolist()


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
        if set(client) != set(keys):
            raise ValueError(f"client {index} sends different parameter names than client 0")
    average: dict[str, np.ndarray] = {}
    for client, weight in zip(arrays, weights, strict=True):
        for key in keys:
            if key in average:
                average[key] += client[key] * weight
            else:
                average[key] = client[key] * weight
    return average


MAX_CLAIM = 1e12  # examples: beyond it claims are scaled down together (no sum of weights overflows)


def weighting_counts(claims: Sequence[float], counted: Sequence[float | None]) -> list[float]:
    """The example count that weights each client: the server's own count where it has one
    (``counted``); else the client's claim, capped at the largest count the server made in the
    same average (a user whose data the server cannot see, such as one with its own data file,
    weighs no more than the largest user it can); with no count at all, the claims (FedAvg)."""
    known = [float(c) for c in counted if c is not None and c > 0]
    cap = max(known) if known else math.inf
    counts = [
        float(c) if c is not None and c > 0 else min(float(claim), cap)
        for c, claim in zip(counted, claims, strict=True)
    ]
    largest = max(counts, default=0.0)
    if math.isinf(cap) and largest > MAX_CLAIM:  # claims alone, one of them absurd: relative weights,
        counts = [c / largest * MAX_CLAIM for c in counts]  # scaled so that no sum overflows
    return counts


def average_metrics(
    records: Sequence[Mapping[str, float | list[float]]],
    counts: Sequence[float],
    partial_prefix: str | None = None,
) -> dict[str, float]:
    """The ``counts``-weighted mean of every scalar metric that all records carry; a key that
    starts with ``partial_prefix`` is averaged over the records that carry it (figures that
    some clients cannot give yet, such as a learned reward model's diagnostics). Lists are
    per-document figures, never averaged."""
    keys = sorted(set().union(*(r.keys() for r in records)))
    averaged = {}
    for key in keys:
        having = [(r[key], n) for r, n in zip(records, counts, strict=True) if key in r]
        if any(isinstance(value, list) for value, _ in having):
            continue
        partial = partial_prefix is not None and key.startswith(partial_prefix)
        if len(having) == len(records) or partial:
            averaged[key] = sum(float(value) * n for value, n in having) / sum(n for _, n in having)
    return averaged
