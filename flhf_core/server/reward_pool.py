"""What the server does with the users' reward models (``reward-model = federated | clustered``).

The reward models' math is in pure functions (:func:`average_reward_models`,
:func:`balanced_assignment`); :class:`RewardModelPool` is the server's state between rounds
(the models and who uses which), in numpy, so tests need no Flower. The strategy carries it
(:class:`~flhf_core.server.strategy.FeedbackFedAvg`'s ``reward_models``); the user's side is
:mod:`flhf_core.client.reward_models`.

**Federated**: one reward model for everyone, the users' models averaged with weights
proportional to the judgements each has given,

    θ_RM = Σ_k n_k θ_k / Σ_k n_k,

so a user who has judged nothing (its model is the untouched copy it received) counts for
nothing. With a personal head (``reward-model-personal-head``) the clients never send it, so
the average is of the encoders alone.

**Clustered** (FedBiscuit: Wu et al., ICLR 2025, https://arxiv.org/abs/2407.03038): K reward
models, each averaged over its own users. Users are grouped by how well each cluster's model
fits their judgements, not by parameter similarity: every so often each user reports the
loss of every cluster's model on its own judgements, and the server assigns users greedily
with equal-sized clusters (:func:`balanced_assignment`), so that no cluster swallows
everyone while another is left without data. Here "every so often" is every feedback round:
each user receives all K models, uses its cluster's, and reports every model's loss on all
the judgements it has given (:func:`flhf_core.learning.reward_model.judgement_loss`). Federated is the
same machinery with K = 1.

The first assignment knows nothing (no user has judged anything): it is balanced and drawn
from the seed. A cluster none of whose users judged anything this round keeps its model; one
that never had a model starts from the average of everyone's.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from flhf_core.server.aggregation import weighted_average


def average_reward_models(
    models: Sequence[dict[str, np.ndarray]], judgements: Sequence[float]
) -> dict[str, np.ndarray] | None:
    """The judgement-weighted average of the users' reward models (None if nobody judged
    anything)."""
    if len(models) != len(judgements):
        raise ValueError(f"{len(models)} reward models for {len(judgements)} judgement counts")
    if any(not math.isfinite(n) or n < 0 for n in judgements):
        raise ValueError(f"judgement counts must be finite and non-negative: {list(judgements)}")
    taken = [(m, n) for m, n in zip(models, judgements, strict=True) if n > 0]
    if not taken:
        return None
    total = sum(n for _, n in taken)
    return weighted_average([m for m, _ in taken], [n / total for _, n in taken])


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


class RewardModelPool:
    """The server's reward models (K = ``clusters``; 1 is ``federated``) and each user's cluster.

    ``models`` is empty until some user has judged something; then it holds K models, each a
    mapping of parameter names to arrays.
    """

    def __init__(self, clusters: int, seed: int) -> None:
        if clusters < 1:
            raise ValueError(f"clusters must be at least 1: got {clusters}")
        self.clusters = clusters
        self.seed = seed
        self.models: list[dict[str, np.ndarray]] = []
        self.assignment: dict[int, int] = {}  # user -> cluster

    def assign(self, users: Sequence[int]) -> None:
        """Give a cluster to every user in ``users`` that has none: the first ones balanced and
        drawn from the seed, a later newcomer to the smallest cluster (ties: the lower index)."""
        new = sorted(set(users) - set(self.assignment))
        if not new:
            return
        if not self.assignment:
            self.assignment = balanced_assignment({u: [0.0] * self.clusters for u in new}, self.seed)
            return
        for user in new:
            sizes = Counter(self.assignment.values())
            self.assignment[user] = min(range(self.clusters), key=lambda k: (sizes[k], k))

    def update(
        self,
        server_round: int,
        models: Mapping[int, dict[str, np.ndarray]],
        judgements: Mapping[int, float],
        losses: Mapping[int, Sequence[float]],
    ) -> dict[str, float]:
        """Fold one round's replies in: each cluster's model becomes the judgement-weighted
        average of its users' models; then, with K > 1, the users that reported every cluster
        model's loss are assigned again (:func:`balanced_assignment`, seeded by the round).
        Returns the round's figures for the server's row."""
        users = sorted(models)
        self.assign(users)
        everyone = average_reward_models([models[u] for u in users], [judgements[u] for u in users])
        if everyone is None:  # nobody has judged anything yet: nothing to learn from
            return {"reward-model-clusters-changed": 0.0}
        updated = []
        for k in range(self.clusters):
            members = [u for u in users if self.assignment[u] == k]
            average = average_reward_models([models[u] for u in members], [judgements[u] for u in members])
            previous = self.models[k] if self.models else everyone
            updated.append(average if average is not None else previous)
        self.models = updated
        changed = 0
        reporting = {u: list(losses[u]) for u in users if len(losses.get(u, ())) == self.clusters}
        if self.clusters > 1 and reporting:
            fresh = balanced_assignment(reporting, seed=self.seed * 1_000_003 + server_round)
            changed = sum(fresh[u] != self.assignment[u] for u in fresh)
            self.assignment.update(fresh)
        return {"reward-model-clusters-changed": float(changed)}
