"""What a user's device does with a message: the logic behind the ClientApp.

One message per user per round. A train message carries the previous round's global model;
the user, in this order:

1. evaluates it, when the server asks (``evaluate-received``), exactly as an evaluate message
   would, into the reply's ``evaluation`` MetricRecord (so no separate evaluate round is needed);
2. judges it on its fresh reward documents (``reward-before``);
3. updates it on its own data or feedback (the local update);
4. judges the updated model on the same documents (``reward``, which may steer aggregation).

An evaluate message (the final model, or every evaluated round under
``separate-evaluation``) does step 1 alone. Every reply says where its time went:
``setup-seconds`` (building the session; cheap after a process's first message, see
:mod:`flhf_core.client.session`), ``train-seconds`` (the local update) and ``eval-seconds``
(everything generated, judged or evaluated). What the user measures is in
:mod:`flhf_core.client.evaluation`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from transformers import PreTrainedModel

from flhf_core.client import personal, reward_models
from flhf_core.client.documents import own_data_file
from flhf_core.client.evaluation import (
    evaluation_metrics,
    reward_metrics,
    state_metrics,
    text_metrics,
    user_judgements,
)
from flhf_core.client.session import UserSession, open_session, user_identity
from flhf_core.learning.algorithms import FEEDBACK_ALGORITHMS
from flhf_core.learning.algorithms.rollout import FeedbackConfig
from flhf_core.learning.algorithms.scorer import LearnedScorer, Scorer
from flhf_core.learning.algorithms.sft import SFTConfig, train_sft
from flhf_core.learning.model import canonical_parameters, parameters_to_record
from flhf_core.protocol import (
    ARRAYS,
    EVALUATE_RECEIVED,
    EVALUATION,
    LEARNING_RATE,
    METRICS,
    NUM_USERS,
    OWN_DATA,
    USER_ID,
    USER_RECORD,
)


def reply(
    message: Message,
    session: UserSession,
    metrics: dict[str, float],
    with_arrays: bool,
    evaluation: dict[str, float] | None = None,
) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics), USER_RECORD: ConfigRecord({USER_ID: session.user})})
    if evaluation is not None:
        content[EVALUATION] = MetricRecord(evaluation)
    if with_arrays:  # only the shared parameters ever leave (and a shared reward model)
        content[ARRAYS] = parameters_to_record(session.model, session.shared_names)
        for key, record in session.outgoing.items():
            content[key] = record
    return Message(content=content, reply_to=message)


def round_seed(session: UserSession, stream: int) -> int:
    return session.config.seed * 100_003 + session.user * 1_009 + session.server_round * 17 + stream


def train(message: Message, context: Context) -> Message:
    """One local round: supervised fine-tuning, or learning from the user's feedback.

    The reply's ``reward`` is the user's mean true utility of the updated model's summaries
    of the user's own fresh documents (nobody trains on them; held-out documents are never
    used to steer), ``reward-before`` that of the received model. With ``evaluate-received``
    it also carries the received model's evaluation (see :func:`~flhf_core.client.evaluation.evaluation_metrics`).
    """
    session = open_session(message, context)
    config = session.config
    signal_training(context, session.server_round)
    started = time.perf_counter()
    evaluation, before = None, None
    if bool(session.server_config.get(EVALUATE_RECEIVED, False)):
        evaluation, before = evaluation_metrics(session, also_judge=session.data.reward)
    if before is None:
        before = user_judgements(session, session.model, session.data.reward)
    judged_before = time.perf_counter()
    torch.manual_seed(round_seed(session, 0))  # dropout masks
    metrics = local_sft(session) if session.phase == "sft" else local_feedback(session)
    updated = time.perf_counter()
    after = user_judgements(session, session.model, session.data.reward)
    metrics.update(reward_metrics(before, "reward-before"))
    metrics.update(reward_metrics(after))
    metrics["reward-gain"] = metrics["reward"] - metrics["reward-before"]
    metrics.update(text_metrics(after))
    metrics["learning-rate"] = float(session.server_config.get(LEARNING_RATE, config.learning_rate))
    metrics.update(state_metrics(session))
    if session.personal_names:
        personal_record = parameters_to_record(session.model, session.personal_names)
        personal.persist(
            context,
            session.state_folder,
            personal_record,
            config.personal_scope,
            session.server_round,
            window=config.checkpoint_every,
        )
    metrics["train-seconds"] = updated - judged_before  # the whole local update (personal part included)
    metrics["eval-seconds"] = (judged_before - started) + (time.perf_counter() - updated)
    metrics["setup-seconds"] = session.setup_seconds
    metrics["torch-threads"] = torch.get_num_threads()
    return reply(message, session, metrics, with_arrays=True, evaluation=evaluation)


def signal_training(context: Context, server_round: int) -> None:
    """Touch the node config's ``training-marker`` file, if any: "local training has started".

    Lets an operator (or a failure test) act at a known point of a round without sleeping.
    """
    marker = context.node_config.get("training-marker")
    if marker:
        path = Path(str(marker))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{server_round}\n")


def interactive() -> bool:
    """Whether a person watches this process's output: a progress bar for the local update
    then (an in-process run in a terminal); none in logs (Flower's workers, CI)."""
    return sys.stderr.isatty()


def local_sft(session: UserSession) -> dict[str, float]:
    """The SFT update; with personal parameters, FedRep's alternating order.

    FedRep (Collins et al., 2021, https://arxiv.org/abs/2102.07078): first the personal
    parameters alone, for ``personal-epochs``, fitted to the global model just received;
    then the shared ones alone, for ``local-epochs``, with the personal ones fixed. Trained
    jointly instead, the personal parameters co-adapt with a local copy of the shared ones
    that the server's average replaces next round, and the personalized model falls behind
    the global one for some users (measured: see README). ``personal-epochs = 0`` trains
    everything together.
    """
    config = session.config
    learning_rate = float(session.server_config.get(LEARNING_RATE, config.learning_rate))
    sft = SFTConfig.from_run_config(config, learning_rate=learning_rate, seed=round_seed(session, 1))
    personal_metrics: dict[str, float] = {}
    # (local-only: every parameter is the user's own, nothing to alternate with)
    alternate = bool(session.personal_names) and bool(session.shared_names) and config.personal_epochs > 0
    if alternate:
        with only_trainable(session.model, session.personal_names):
            personal = train_sft(
                session.model,
                session.tokenizer,
                session.data.train,
                replace(sft, epochs=config.personal_epochs),
                progress=interactive(),
                encoded=session.encoded_train,
            )
        personal_metrics = {
            "personal-loss-first": personal.first_loss,
            "personal-loss-last": personal.last_loss,
            "personal-seconds": personal.seconds,
        }
    with only_trainable(session.model, session.shared_names) if alternate else nullcontext():
        stats = train_sft(
            session.model,
            session.tokenizer,
            session.data.train,
            sft,
            progress=interactive(),
            encoded=session.encoded_train,
        )
    return {
        **personal_metrics,
        "num-examples": len(session.data.train),
        "train-loss": stats.loss,
        "train-loss-first": stats.first_loss,
        "train-loss-last": stats.last_loss,
        "train-steps": stats.steps,
        "train-ratings-used": 0.0,  # no feedback asked in a supervised round
        "shared-seconds": stats.seconds,  # the shared update; the personal one is personal-seconds
        "tokens-per-second": stats.tokens_per_second,
    }


@contextmanager
def only_trainable(model: PreTrainedModel, names: frozenset[str]) -> Iterator[None]:
    """Within the block, only the parameters called ``names`` receive gradients."""
    params = canonical_parameters(model)
    before = {name: p.requires_grad for name, p in params.items()}
    for name, p in params.items():
        p.requires_grad_(before[name] and name in names)
    try:
        yield
    finally:
        for name, p in params.items():
            p.requires_grad_(before[name])


def local_feedback(session: UserSession) -> dict[str, float]:
    config = session.config
    feedback = FeedbackConfig.from_run_config(config)
    if config.mode == "centralized":
        # one learner: the steps of every user a federated round samples, one after another
        sampled = max(1, int(session.num_users * config.fraction_train))
        feedback = replace(feedback, steps=feedback.steps * sampled)
        budget_scale = sampled  # and the judgements of every such user
    else:
        budget_scale = 1
    if not session.data.feedback:
        raise ValueError(f"user {session.user} holds no documents to give feedback on")
    update = FEEDBACK_ALGORITHMS[config.feedback_algorithm]
    rng = np.random.default_rng(round_seed(session, 2))
    ratings = config.ratings_per_round * budget_scale
    budget = (session.profile, ratings, feedback.steps, feedback.samples_per_prompt)
    # with a reward model, it scores what the user did not judge (reward_models.py)
    scorer = (
        reward_models.learned_scorer(session, budget) if config.reward_model != "none" else Scorer(*budget)
    )
    stats = update(session.model, session.tokenizer, list(session.data.feedback), scorer, feedback, rng)
    metrics = {
        "num-examples": len(session.data.feedback),
        **{f"train-{k}": v for k, v in stats.items()},
        "train-ratings-used": float(scorer.used),
    }
    if isinstance(scorer, LearnedScorer):
        metrics.update(reward_models.finish(session, scorer))
    return metrics


def evaluate(message: Message, context: Context) -> Message:
    """The received global model's evaluation alone (see :func:`~flhf_core.client.evaluation.evaluation_metrics`)."""
    session = open_session(message, context)
    started = time.perf_counter()
    metrics, _ = evaluation_metrics(session)
    metrics["eval-seconds"] = time.perf_counter() - started
    metrics["setup-seconds"] = session.setup_seconds
    return reply(message, session, metrics, with_arrays=False)


def identify(message: Message, context: Context) -> Message:
    """Which user this node serves: its ``partition-id`` and ``num-partitions``, and whether it
    holds its own data file (then the server cannot count its examples).

    The server asks once per node and run, so that it samples users (the same ones in
    every run with the same seed) instead of Flower's random node ids.
    """
    user, num_users = user_identity(context)
    identity = {USER_ID: user, NUM_USERS: num_users, OWN_DATA: own_data_file(context) is not None}
    content = RecordDict({USER_RECORD: ConfigRecord(identity)})
    return Message(content=content, reply_to=message)
