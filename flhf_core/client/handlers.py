"""What a user's device does with a message: the logic behind the ClientApp.

One message per user per round. A train message carries the previous round's global model;
the train handler reads top to bottom, one call into one module a step:

1. restore: the received model with the user's personal state (:mod:`.session`);
2. evaluate the model received, when the server asks (``evaluate-received``), exactly as an
   evaluate message would, and judge it on the user's fresh reward documents
   (``reward-before``) (:mod:`.evaluation`);
3. the local update, on the user's own data or feedback (:mod:`.update`);
4. judge the updated model on the same documents (``reward``, which may steer aggregation);
5. persist the personal parameters (:mod:`.session`), and reply with the shared ones.

An evaluate message (the final model, or every evaluated round under
``separate-evaluation``) does step 2 alone. Every reply says where its time went:
``setup-seconds`` (building the session; cheap after a process's first message),
``train-seconds`` (the local update) and ``eval-seconds`` (everything generated, judged or
evaluated).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from flhf_core.client.documents import own_data_file
from flhf_core.client.evaluation import evaluation_metrics, judge_received, judge_update
from flhf_core.client.faults import misbehave
from flhf_core.client.session import UserSession, open_session, save_personal, user_identity
from flhf_core.client.update import local_update
from flhf_core.learning.model import parameters_to_record
from flhf_core.protocol import (
    ARRAYS,
    EVALUATION,
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


def train(message: Message, context: Context) -> Message:
    """One local round: supervised fine-tuning, or learning from the user's feedback.

    The reply's ``reward`` is the user's mean true utility of the updated model's summaries
    of the user's own fresh documents (nobody trains on them; held-out documents are never
    used to steer), ``reward-before`` that of the received model. With ``evaluate-received``
    it also carries the received model's evaluation (see :func:`~flhf_core.client.evaluation.evaluation_metrics`).
    """
    session = open_session(message, context)  # the received model, with the user's personal state
    signal_training(context, session.server_round)
    started = time.perf_counter()
    evaluation, before = judge_received(session)
    judged_before = time.perf_counter()
    metrics = local_update(session)
    updated = time.perf_counter()
    metrics.update(judge_update(session, before))
    save_personal(session)
    metrics["train-seconds"] = updated - judged_before  # the whole local update (personal part included)
    metrics["eval-seconds"] = (judged_before - started) + (time.perf_counter() - updated)
    metrics["setup-seconds"] = session.setup_seconds
    metrics["torch-threads"] = torch.get_num_threads()
    answer = reply(message, session, metrics, with_arrays=True, evaluation=evaluation)
    return misbehave(
        answer, context, session.server_round, session.user, session.num_users
    )  # fault campaigns only


def signal_training(context: Context, server_round: int) -> None:
    """Touch the node config's ``training-marker`` file, if any: "local training has started".

    Lets an operator (or a failure test) act at a known point of a round without sleeping.
    """
    marker = context.node_config.get("training-marker")
    if marker:
        path = Path(str(marker))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{server_round}\n")


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
