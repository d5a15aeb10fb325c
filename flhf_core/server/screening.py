"""Which replies count: the screening half of :class:`~flhf_core.server.strategy.FeedbackFedAvg`.

Flower's FedAvg raises ``InconsistentMessageReplies`` on one bad reply, which ends the run.
FLHF screens every reply before aggregation instead: error replies, missing records or keys,
arrays whose names, shapes or dtypes differ from the global model's, non-finite figures and
rewards outside [0, 1] are rejected, logged and counted in the round's
:class:`~flhf_core.results.rounds.RoundReport`; what is left is sorted by user, so the average does
not depend on the order replies arrived in. The pure checks live in :mod:`flhf_core.server.replies`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.supercore import log

from flhf_core.protocol import EVALUATION, USER_ID, USER_RECORD
from flhf_core.results.rounds import METRIC_COLUMNS, Rejection, RoundReport
from flhf_core.server.aggregation import REWARD_SHORTFALL
from flhf_core.server.replies import Problem, Signature, arrays_of, decode_arrays, lists, own_metrics, scalars
from flhf_core.server.reward_models import RewardModelExchange


@dataclass
class Checked:
    """A reply as screening read it: whose it is, why it cannot count (None: it can), and its
    decoded parameters (and reward model, in rounds that carry them)."""

    user_id: int
    problem: Problem | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    reward_model: dict[str, np.ndarray] | None = None


def reject(report: RoundReport, node_id: int, user_id: int | None, problem: Problem) -> None:
    """Count a reply out of the round, with why, and say so in the log."""
    report.rejected.append(Rejection(node_id, user_id, problem.reason, problem.code))
    who = f"node {node_id}" + ("" if user_id is None else f" (user {user_id})")
    log(
        WARNING,
        "round %d %s: no valid reply from %s: [%s] %s",
        report.server_round,
        report.phase,
        who,
        problem.code,
        problem.reason,
    )


class ReplyScreening:
    """Screens replies for :class:`~flhf_core.server.strategy.FeedbackFedAvg`, whose ``__init__`` (and
    FedAvg's) set the attributes declared below.

    A node's user is bound once: by the owner's identification (:attr:`node_users`) or by the
    node's first valid reply. A reply naming another user than its node's, or a user another
    node holds, is rejected (``identity``). The arrays of a valid training reply are decoded
    once, here, and the strategy averages those (:attr:`decoded`)."""

    reward_key: str
    reward_weighting: str
    train_loss_key: str
    arrayrecord_key: str
    weighted_by_key: str
    reward_models: RewardModelExchange | None
    reward_models_active: bool
    reports: dict[tuple[int, str], RoundReport]
    node_users: dict[int, int]
    decoded: dict[int, dict[str, np.ndarray]]  # user -> its valid reply's parameters, this phase
    decoded_reward_models: dict[int, dict[str, np.ndarray]]  # user -> its valid reply's reward model
    _sent: dict[tuple[int, str], list[Message]]

    @property
    def carries_reward_models(self) -> bool:
        """Whether this round's training messages and replies carry reward models."""
        return self.reward_models is not None and self.reward_models_active

    @property
    def required_metrics(self) -> tuple[str, ...]:
        """What a training reply must carry for the current weighting."""
        return {
            "none": (),
            "gain": (self.reward_key, f"{self.reward_key}-before"),
            "history": (f"{self.reward_key}-before",),
            "qfedavg": (f"{self.reward_key}-before",)
            if self.train_loss_key == REWARD_SHORTFALL
            else (self.train_loss_key,),
        }.get(self.reward_weighting, (self.reward_key,))

    @property
    def scalar_metrics(self) -> tuple[str, ...]:
        """Figures that must be single finite numbers wherever a reply carries them: what
        weights a reply, and what the rows and the weighting read as numbers."""
        return (
            self.weighted_by_key,
            self.reward_key,
            f"{self.reward_key}-before",
            self.train_loss_key,
        )

    def _node_of(self, reply: Message, server_round: int, phase: str) -> int:
        """The node a reply answers for (error replies come from the SuperLink)."""
        if not reply.has_error():
            return reply.metadata.src_node_id
        for sent in self._sent.get((server_round, phase), []):
            if sent.metadata.message_id == reply.metadata.reply_to_message_id:
                return sent.metadata.dst_node_id
        return reply.metadata.src_node_id

    def identity_problem(self, node_id: int, user_id: int) -> Problem | None:
        """Why node ``node_id`` may not answer for user ``user_id`` (None if it may)."""
        bound = self.node_users.get(node_id)
        if bound is not None and bound != user_id:
            return Problem("identity", f"node {node_id} serves user {bound}; its reply names user {user_id}")
        if bound is None:
            holders = [node for node, user in self.node_users.items() if user == user_id]
            if holders:
                return Problem("identity", f"user {user_id} is served by node {holders[0]}")
        return None

    def screen(
        self, server_round: int, replies: Iterable[Message], phase: str, expected: Signature | None
    ) -> list[tuple[int, RecordDict]]:
        """Valid ``(user_id, content)`` pairs sorted by user id; rejections go to the report.

        ``expected`` is the signature the parameters must have (None: no parameters are
        expected, as in evaluation replies). No reply, however formed, raises here: each is
        valid or rejected with a code.
        """
        report = self.reports.setdefault((server_round, phase), RoundReport(server_round, phase))
        valid: dict[int, RecordDict] = {}
        answered: set[int] = set()
        self.decoded, self.decoded_reward_models = {}, {}
        for reply in replies:
            node_id = self._node_of(reply, server_round, phase)
            answered.add(node_id)
            if reply.has_error():
                checked = Checked(
                    self.node_users.get(node_id), Problem("error", f"error reply: {reply.error.reason}")
                )
            else:
                checked = self._check_content(reply.content, expected, node_id, phase)
                if checked.problem is None:
                    checked.problem = self.identity_problem(node_id, checked.user_id)
                if checked.problem is None and checked.user_id in valid:
                    checked.problem = Problem("duplicate", f"a second reply for user {checked.user_id}")
            if checked.problem is not None:
                reject(report, node_id, checked.user_id, checked.problem)
                continue
            valid[checked.user_id] = reply.content
            self.node_users[node_id] = checked.user_id
            self.decoded[checked.user_id] = checked.arrays
            if checked.reward_model is not None:
                self.decoded_reward_models[checked.user_id] = checked.reward_model
        for node_id in sorted(set(report.sampled_nodes) - answered):
            reject(
                report,
                node_id,
                self.node_users.get(node_id),
                Problem("timeout", "no reply within the round timeout"),
            )
        ordered = sorted(valid.items())
        for user_id, content in ordered:
            report.user_metrics[user_id] = scalars(own_metrics(content))
            report.user_lists[user_id] = lists(own_metrics(content))
        return ordered

    def _check_content(
        self, content: RecordDict, expected: Signature | None, node_id: int, phase: str
    ) -> Checked:
        """The reply's user (its user record, else the node's known user, else the node id),
        why it is unusable, and its decoded arrays."""
        user = content.config_records.get(USER_RECORD)
        if user is None:
            checked = Checked(self.node_users.get(node_id, node_id))
        elif isinstance(user.get(USER_ID), int) and not isinstance(user.get(USER_ID), bool):
            checked = Checked(int(user[USER_ID]))
        else:
            problem = Problem("identity", f"'{USER_RECORD}.{USER_ID}' is not an integer")
            return Checked(self.node_users.get(node_id, node_id), problem)
        metrics = own_metrics(content)
        if metrics is None:
            others = [k for k in content.metric_records if k != EVALUATION]
            reason = f"expected one MetricRecord (besides '{EVALUATION}'), got {len(others)}"
            checked.problem = Problem("metrics", reason)
            return checked
        # what the weighting needs is required of training replies only: an evaluation has no update to weigh
        required = self.required_metrics if phase == MessageType.TRAIN else ()
        checked.problem = self.metrics_problem(metrics, required)
        if checked.problem or expected is None:
            return checked
        if phase == MessageType.TRAIN and self.carries_reward_models:
            checked.problem, checked.reward_model = self.reward_models.problem(
                content, metrics, self.arrayrecord_key
            )
            if checked.problem:
                return checked
        elif len(content.array_records) != 1:
            checked.problem = Problem("shape", f"expected one ArrayRecord, got {len(content.array_records)}")
            return checked
        checked.arrays, checked.problem = decode_arrays(arrays_of(content, self.arrayrecord_key), expected)
        return checked

    def metrics_problem(self, metrics: MetricRecord, required: Iterable[str] = ()) -> Problem | None:
        """Why a MetricRecord is unusable (code ``metrics``): no positive example count, a
        figure that must be one number and is a list, a non-finite value, a missing required
        key, a reward outside [0, 1]."""
        weight = metrics.get(self.weighted_by_key)
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            return Problem(
                "metrics", f"'{self.weighted_by_key}' missing or not a positive number: {weight!r}"
            )
        for key in self.scalar_metrics:
            if isinstance(metrics.get(key), list):
                return Problem("metrics", f"metric '{key}' must be one number, got a list")
        for key, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            if not all(math.isfinite(v) for v in values):
                return Problem("metrics", f"metric '{key}' is not finite")
        for key in required:
            if key not in metrics:
                return Problem("metrics", f"metric '{key}' is missing")
        reserved = sorted(set(metrics) & set(METRIC_COLUMNS))
        if reserved:  # would overwrite a row's own columns (its round, its user)
            return Problem("metrics", f"metrics {reserved} are names of a row's columns")
        if self.reward_weighting == "qfedavg" and float(metrics.get(self.train_loss_key, 0.0)) < 0:
            return Problem("metrics", f"metric '{self.train_loss_key}' is negative: q-FFL needs a loss")
        for key in (self.reward_key, f"{self.reward_key}-before"):
            if key in metrics and not 0.0 <= float(metrics[key]) <= 1.0:
                return Problem("metrics", f"metric '{key}' = {metrics[key]} is outside [0, 1]")
        return None
