"""What the server does with the users' reward models (issue 13), as pure functions.

Not wired into the strategy yet: ``reward-model = federated | clustered`` are the next
step (see the issue's note); these are their tested building blocks.

**Federated**: one reward model for everyone, the users' models averaged with weights
proportional to the judgements each has given,

    θ_RM = Σ_k n_k θ_k / Σ_k n_k,

so a user who has judged nothing (its model is the untouched copy it received) counts for
nothing. With a personal head, the parameters under ``personal_prefix`` stay on the clients
and are left out.

**Clustered** (FedBiscuit: Wu et al., ICLR 2025, https://arxiv.org/abs/2407.03038): K reward
models, each averaged over its own users. Users are grouped by how well each cluster's model
fits their judgements, not by parameter similarity: every so often each user reports the
loss of every cluster's model on its own judgements, and the server assigns users greedily
with equal-sized clusters (:func:`balanced_assignment`), so that no cluster swallows
everyone while another is left without data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import numpy as np

from .aggregation import weighted_average


def average_reward_models(
    models: Sequence[dict[str, np.ndarray]], judgements: Sequence[float], personal_prefix: str | None = None
) -> dict[str, np.ndarray] | None:
    """The judgement-weighted average of the users' reward models (None if nobody judged
    anything); parameters whose name starts with ``personal_prefix`` are left out."""
    if len(models) != len(judgements):
        raise ValueError(f"{len(models)} reward models for {len(judgements)} judgement counts")
    if any(not math.isfinite(n) or n < 0 for n in judgements):
        raise ValueError(f"judgement counts must be finite and non-negative: {list(judgements)}")
    taken = [(m, n) for m, n in zip(models, judgements, strict=True) if n > 0]
    if not taken:
        return None
    total = sum(n for _, n in taken)

    def shared(model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if personal_prefix is None:
            return model
        return {k: v for k, v in model.items() if not k.startswith(personal_prefix)}

    return weighted_average([shared(m) for m, _ in taken], [n / total for _, n in taken])


def balanced_assignment(losses: Mapping[int, Sequence[float]], seed: int) -> dict[int, int]:
    """Each user's cluster, from ``losses[user][k]``: the loss of cluster k's reward model on the
    user's judgements (lower fits better). FedBiscuit's greedy balanced rule:

    1. the unassigned users, in an order shuffled by ``seed``, each propose the open cluster
       whose model fits them best (ties: the lower index);
    2. the open cluster with the most proposals (ties: the lower index) takes the first
       ceil(unassigned / open) of its proposers and closes;
    3. repeat until every user is assigned.

    No cluster ends with more than ceil(users / K) users, and the same losses and seed give the
    same assignment.
    """
    if not losses:
        return {}
    clusters = {len(row) for row in losses.values()}
    if len(clusters) != 1 or 0 in clusters:
        raise ValueError(f"every user needs one loss per cluster: got {sorted(clusters)} losses")
    unassigned = sorted(losses)
    random.Random(seed).shuffle(unassigned)
    still_open = list(range(clusters.pop()))
    assignment: dict[int, int] = {}
    while unassigned:
        proposals: dict[int, list[int]] = {k: [] for k in still_open}
        for user in unassigned:
            proposals[min(still_open, key=lambda k, u=user: (losses[u][k], k))].append(user)
        chosen = max(still_open, key=lambda k: (len(proposals[k]), -k))
        capacity = math.ceil(len(unassigned) / len(still_open))
        for user in proposals[chosen][:capacity]:
            assignment[user] = chosen
        unassigned = [u for u in unassigned if u not in assignment]
        still_open.remove(chosen)
    return assignment
