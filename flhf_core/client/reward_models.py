"""The user's side of a learned reward model: which model scores this round, what goes back.

* ``personal``: the user's own model and judgements, restored from the previous feedback
  round (:func:`flhf_core.client.reward_state.restore`); nothing leaves the client.
* ``federated`` / ``clustered``: the train message carries the server's reward models
  (``reward-model-0``, ``-1``, ...; none before anyone has judged anything) and the user's
  cluster. The user starts from its cluster's model, fits it to all the judgements it has
  given (they never leave the client), and sends the fitted model back as ``reward-model``,
  with how many judgements it learned from (what weights it in the average) and, when there
  are several clusters, every received model's loss on those judgements (what the server
  assigns clusters by: :mod:`flhf_core.server.reward_pool`). With
  ``reward-model-personal-head`` only the encoder travels: the user keeps its own head, so a
  shared representation can serve users who want different things.
"""

from __future__ import annotations

import copy
import dataclasses

from flwr.app import ArrayRecord, RecordDict

from flhf_core.client import reward_state
from flhf_core.client.session import UserSession
from flhf_core.learning import reward_model
from flhf_core.learning.algorithms.scorer import LearnedScorer
from flhf_core.learning.model import parameters_to_record, record_to_parameters
from flhf_core.protocol import (
    CLUSTER,
    CLUSTER_LOSSES,
    CLUSTER_OF_USER,
    REWARD_ASSIGNMENT,
    REWARD_JUDGEMENTS,
    REWARD_MODEL,
    REWARD_MODELS,
)

SHARED_MODES = ("federated", "clustered")
REWARD_MODEL_STREAM = 13  # tells the reward model's random stream from the user's others


def received_models(content: RecordDict) -> list[ArrayRecord]:
    """The server's reward models, in cluster order (empty before anyone judged anything)."""
    models: list[ArrayRecord] = []
    while (key := f"{REWARD_MODELS}{len(models)}") in content.array_records:
        models.append(content.array_records[key])
    return models


def assigned_cluster(content: RecordDict) -> int:
    """The cluster the server put this user in (0 when it said nothing: federated)."""
    assignment = content.config_records.get(REWARD_ASSIGNMENT)
    return int(assignment[CLUSTER]) if assignment is not None else 0


def learned_scorer(session: UserSession, budget: tuple) -> LearnedScorer:
    """The scorer of a user with a reward model: ``budget`` is :class:`Scorer`'s arguments."""
    config = session.config
    model, judgements = reward_state.restore(
        session.context,
        session.state_folder,
        session.model,
        session.server_round,
        config.reward_model_encoder,
    )
    shared = received_models(session.received)
    if config.reward_model in SHARED_MODES and shared:
        names = reward_model.shared_names(model, config.reward_model_personal_head, session.personal_names)
        cluster = assigned_cluster(session.received)
        record_to_parameters(model, shared[cluster], names=names)
        if config.reward_model == "clustered":
            judgements = checked_by(judgements, cluster)
    return LearnedScorer(
        *budget,
        model,
        reward_model.reward_tokenizer(config.reward_model_encoder, session.tokenizer),
        judgements,
        config.reward_model_steps,
        config.reward_model_learning_rate,
        config.reward_model_length_learning_rate,
        config.max_source_tokens,
        active=config.reward_queries == "active",
        trust=config.reward_model_trust,
        seed=[config.seed, session.user, session.server_round, REWARD_MODEL_STREAM],
    )


def checked_by(judgements: reward_model.Judgements, cluster: int) -> reward_model.Judgements:
    """The judgements, with the gate's record of checks kept only if ``cluster``'s model made
    it. The user's own first model and the federated average continue the model the checks
    measured (the user's fitted model is in the average), so their records carry over; a
    clustered user moved to another cluster scores with another model, which has to earn the
    gate's trust on the user's judgements anew. (A user whose first fitted model never
    reached the server joins a cluster that lacks it, and keeps its record: an edge case.)"""
    moved = judgements.checked_cluster is not None and judgements.checked_cluster != cluster
    checks = [] if moved else judgements.checks
    return dataclasses.replace(judgements, checks=checks, checked_cluster=cluster)


def finish(session: UserSession, scorer: LearnedScorer) -> dict[str, float | list[float]]:
    """Keep the user's reward model and judgements; under a shared mode, put the fitted model
    in the reply. Returns the round's reward-model figures."""
    config = session.config
    reward_state.keep(
        session.context,
        session.state_folder,
        scorer.reward_model,
        scorer.judgements,
        session.server_round,
        window=config.checkpoint_every,
    )
    metrics: dict[str, float | list[float]] = {
        **scorer.diagnostics(),
        **{f"train-reward-model-{k}": v for k, v in scorer.losses.items()},
        REWARD_JUDGEMENTS: float(len(scorer.judgements)),
    }
    if config.reward_model not in SHARED_MODES:
        return metrics
    names = reward_model.shared_names(
        scorer.reward_model, config.reward_model_personal_head, session.personal_names
    )
    session.outgoing[REWARD_MODEL] = parameters_to_record(scorer.reward_model, names)
    metrics[CLUSTER_OF_USER] = float(assigned_cluster(session.received))
    shared = received_models(session.received)
    if config.reward_model == "clustered" and shared and len(scorer.judgements):
        metrics[CLUSTER_LOSSES] = cluster_losses(session, scorer, shared)
    return metrics


def cluster_losses(session: UserSession, scorer: LearnedScorer, models: list[ArrayRecord]) -> list[float]:
    """Each received model's loss on every judgement the user has given (this round's too),
    completed by the user's own parameters where they are personal (a personal head, an
    adapter): the model the user would score with in that cluster."""
    candidate = copy.deepcopy(scorer.reward_model)
    names = reward_model.shared_names(
        candidate, session.config.reward_model_personal_head, session.personal_names
    )
    losses = []
    for record in models:
        record_to_parameters(candidate, record, names=names)
        losses.append(
            reward_model.judgement_loss(
                candidate, scorer.tokenizer, scorer.judgements, session.config.max_source_tokens
            )
        )
    return losses
