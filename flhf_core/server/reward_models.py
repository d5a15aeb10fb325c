"""The server's side of shared reward models in Flower messages (``reward-model = federated |
clustered``); the user's side is :mod:`flhf_core.client.reward_models`, the math
:mod:`flhf_core.server.reward_pool`.

In the rounds that carry reward models (feedback rounds), :class:`~flhf_core.server.strategy.FeedbackFedAvg`
delegates here:

* each training message also carries every model of the pool (``reward-model-0``, ...; none
  before anyone has judged anything) and the user's cluster (``reward-model-assignment``);
* each training reply must carry the user's fitted model (``reward-model``, screened like the
  parameters: the same names, shapes and dtypes as the pool's, finite), the judgements it
  learned from, and at most one loss per cluster model;
* the valid replies are folded into the pool. The judgements a reply claims weigh its model,
  so the server caps the claim at what the user can have given: ``ratings-per-round`` times
  the feedback rounds it was sent (a client cannot take over the average by claiming a
  billion judgements, as with examples).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from flhf_core.protocol import (
    CLUSTER,
    CLUSTER_LOSSES,
    REWARD_ASSIGNMENT,
    REWARD_JUDGEMENTS,
    REWARD_MODEL,
    REWARD_MODELS,
)
from flhf_core.results.checkpoint import CheckpointError
from flhf_core.server.replies import (
    Problem,
    Signature,
    decode_arrays,
    majority_signature,
    signature,
)
from flhf_core.server.reward_pool import RewardModelPool


class RewardModelExchange:
    """The pool of shared reward models, and what the messages of a round say about them."""

    def __init__(self, pool: RewardModelPool, budget: int) -> None:
        if budget < 1:
            raise ValueError(f"a shared reward model needs a judgement budget: got {budget}")
        self.pool = pool
        self.budget = budget  # ratings-per-round
        self.rounds_taken: dict[int, int] = {}  # user -> feedback rounds it was sent (so could judge in)
        self.expected: Signature | None = None  # what this round's replies' reward models must match

    def messages(self, record: RecordDict, users: dict[int, int]) -> list[Message]:
        """One training message per node (``users``: node -> user): ``record`` (the global model
        and config), every reward model of the pool and the user's cluster."""
        self.pool.assign(list(users.values()))
        for user in users.values():  # each message may bring back a round's judgements
            self.rounds_taken[user] = self.rounds_taken.get(user, 0) + 1
        models = {
            f"{REWARD_MODELS}{k}": ArrayRecord({name: Array(a) for name, a in model.items()})
            for k, model in enumerate(self.pool.models)
        }
        messages = []
        for node, user in users.items():
            content = RecordDict({**record, **models})
            content[REWARD_ASSIGNMENT] = ConfigRecord({CLUSTER: self.pool.assignment[user]})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return messages

    def expect(self, replies: list[Message]) -> None:
        """Fix the signature replies' reward models must have: the pool's models', else (in the
        first round that carries them) the one most replies share."""
        if self.pool.models:
            self.expected = signature(ArrayRecord({k: Array(v) for k, v in self.pool.models[0].items()}))
        else:
            self.expected = majority_signature(replies, REWARD_MODEL)

    def problem(
        self, content: RecordDict, metrics: MetricRecord, arrays_key: str
    ) -> tuple[Problem | None, dict[str, np.ndarray] | None]:
        """Why a training reply's reward model is unusable (None if it is usable), and the model
        decoded (None when there is nothing to check it against yet)."""
        wanted = {arrays_key, REWARD_MODEL}
        if set(content.array_records) != wanted:
            reason = f"expected the ArrayRecords {sorted(wanted)}, got {sorted(content.array_records)}"
            return Problem("shape", reason), None
        judgements = metrics.get(REWARD_JUDGEMENTS)
        if judgements is None or isinstance(judgements, list) or judgements < 0:
            return Problem("metrics", f"metric '{REWARD_JUDGEMENTS}' missing or negative"), None
        losses = metrics.get(CLUSTER_LOSSES, [])
        if not isinstance(losses, list) or len(losses) not in (0, self.pool.clusters):
            return Problem("metrics", f"metric '{CLUSTER_LOSSES}' must list one loss per cluster model"), None
        if self.expected is None:
            return None, None
        decoded, problem = decode_arrays(content[REWARD_MODEL], self.expected, what="reward model")
        return problem, decoded

    def fold(
        self,
        server_round: int,
        valid: list[tuple[int, RecordDict]],
        metrics_of,
        decoded: dict[int, dict[str, np.ndarray]],
    ) -> dict[str, float]:
        """The valid replies' reward models into the pool (see :meth:`RewardModelPool.update`),
        each weighted by its judgements, capped at what the user can have given. ``decoded``:
        each user's model as screening decoded it; a round whose replies agreed on no signature
        (no pool yet, and no majority) folds none."""
        claims = {}
        for user, content in valid:  # a user judges in every round it is sent, replied or not
            claimed = float(metrics_of(content)[REWARD_JUDGEMENTS])
            claims[user] = min(claimed, float(self.budget * self.rounds_taken.get(user, 0)))
        return self.pool.update(
            server_round,
            models={user: decoded[user] for user, _ in valid if user in decoded},
            judgements=claims,
            losses={
                user: [float(x) for x in metrics_of(content).get(CLUSTER_LOSSES, [])]
                for user, content in valid
                if claims[user] > 0  # a user with nothing judged has no fit to report
            },
        )

    # --- checkpoints ----------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What a resume needs: the assignment and rounds taken (JSON), the models (arrays)."""
        info = {
            "clusters": self.pool.clusters,
            "models": len(self.pool.models),
            "assignment": {str(u): k for u, k in self.pool.assignment.items()},
            "rounds-taken": {str(u): n for u, n in self.rounds_taken.items()},
        }
        arrays = {f"{k}/{name}": a for k, model in enumerate(self.pool.models) for name, a in model.items()}
        return info, arrays

    def restore(self, info: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """The state :meth:`state` saved; raises CheckpointError if it is not a whole one."""
        try:
            clusters, count = int(info["clusters"]), int(info["models"])
            assignment = {int(u): int(k) for u, k in info["assignment"].items()}
            rounds_taken = {int(u): int(n) for u, n in info["rounds-taken"].items()}
            models: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
            for key, array in arrays.items():
                k, name = key.split("/", 1)
                models[int(k)][name] = array
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
            raise CheckpointError(f"the checkpoint's reward models are unusable: {error!r}") from None
        problems = []
        if clusters != self.pool.clusters:
            problems.append(f"{clusters} clusters, this run {self.pool.clusters}")
        if count not in (0, clusters) or any(not m or m.keys() != models[0].keys() for m in models):
            problems.append(f"{count} models, not all whole and alike")
        if any(not 0 <= k < clusters for k in assignment.values()):
            problems.append("a user assigned to a cluster that does not exist")
        if problems:
            raise CheckpointError(f"the checkpoint's reward models are unusable: {'; '.join(problems)}")
        self.pool.assignment, self.rounds_taken, self.pool.models = assignment, rounds_taken, models


def check_resumable(strategy_state: dict[str, Any], reward_model: str, shared: bool) -> None:
    """A checkpoint of a run with a reward model must come from an FLHF that kept what its
    resume needs: the users' versions (``reward-model-versions``) and, when the reward models
    are shared, the server's (``reward-models``). An older one would resume silently wrong."""
    if reward_model == "none":
        return
    if "reward-model-versions" not in strategy_state or (shared and "reward-models" not in strategy_state):
        raise CheckpointError(
            f"this checkpoint of a reward-model={reward_model!r} run was written before such runs could "
            "be resumed (it lacks the reward models' state); start the run again."
        )
