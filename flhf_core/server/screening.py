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
from logging import WARNING

from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.supercore import log

from flhf_core.protocol import EVALUATION, USER_ID, USER_RECORD
from flhf_core.results.rounds import Rejection, RoundReport
from flhf_core.server.aggregation import REWARD_SHORTFALL
from flhf_core.server.replies import Signature, arrays_of, arrays_problem, lists, own_metrics, scalars
from flhf_core.server.reward_models import RewardModelExchange


def reject(report: RoundReport, node_id: int, user_id: int | None, reason: str) -> None:
    """Count a reply out of the round, with why, and say so in the log."""
    report.rejected.append(Rejection(node_id, user_id, reason))
    who = f"node {node_id}" + ("" if user_id is None else f" (user {user_id})")
    log(WARNING, "round %d %s: no valid reply from %s: %s", report.server_round, report.phase, who, reason)


class ReplyScreening:
    """Screens replies for :class:`~flhf_core.server.strategy.FeedbackFedAvg`, whose ``__init__`` (and
    FedAvg's) set the attributes declared below."""

    reward_key: str
    reward_weighting: str
    train_loss_key: str
    arrayrecord_key: str
    weighted_by_key: str
    reward_models: RewardModelExchange | None
    reward_models_active: bool
    reports: dict[tuple[int, str], RoundReport]
    node_users: dict[int, int]
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

    def _node_of(self, reply: Message, server_round: int, phase: str) -> int:
        """The node a reply answers for (error replies come from the SuperLink)."""
        if not reply.has_error():
            return reply.metadata.src_node_id
        for sent in self._sent.get((server_round, phase), []):
            if sent.metadata.message_id == reply.metadata.reply_to_message_id:
                return sent.metadata.dst_node_id
        return reply.metadata.src_node_id

    def screen(
        self, server_round: int, replies: Iterable[Message], phase: str, expected: Signature | None
    ) -> list[tuple[int, RecordDict]]:
        """Valid ``(user_id, content)`` pairs sorted by user id; rejections go to the report.

        ``expected`` is the signature the parameters must have (None: no parameters are
        expected, as in evaluation replies).
        """
        report = self.reports.setdefault((server_round, phase), RoundReport(server_round, phase))
        valid: dict[int, RecordDict] = {}
        answered: set[int] = set()
        for reply in replies:
            node_id = self._node_of(reply, server_round, phase)
            answered.add(node_id)
            user_id, reason = self.node_users.get(node_id), None
            if reply.has_error():
                reason = f"error reply: {reply.error.reason}"
            else:
                user_id, reason = self._check_content(reply.content, expected, node_id, phase)
                if reason is None and user_id in valid:
                    reason = f"duplicate reply for user {user_id}"
            if reason is None:
                valid[user_id] = reply.content
                self.node_users[node_id] = user_id
            else:
                reject(report, node_id, user_id, reason)
        for node_id in sorted(set(report.sampled_nodes) - answered):
            reject(report, node_id, self.node_users.get(node_id), "no reply within the round timeout")
        ordered = sorted(valid.items())
        for user_id, content in ordered:
            report.user_metrics[user_id] = scalars(own_metrics(content))
            report.user_lists[user_id] = lists(own_metrics(content))
        return ordered

    def _check_content(
        self, content: RecordDict, expected: Signature | None, node_id: int, phase: str
    ) -> tuple[int, str | None]:
        """The reply's user (its user record, else the node's known user, else the node id) and
        why the reply is unusable (None if it is usable)."""
        user = content.config_records.get(USER_RECORD)
        if user is None:
            user_id = self.node_users.get(node_id, node_id)
        elif isinstance(user.get(USER_ID), int) and not isinstance(user.get(USER_ID), bool):
            user_id = int(user[USER_ID])
        else:
            return self.node_users.get(node_id, node_id), f"'{USER_RECORD}.{USER_ID}' is not an integer"
        metrics = own_metrics(content)
        if metrics is None:
            others = [k for k in content.metric_records if k != EVALUATION]
            return user_id, f"expected one MetricRecord (besides '{EVALUATION}'), got {len(others)}"
        # what the weighting needs is required of training replies only: an evaluation has no update to weigh
        required = self.required_metrics if phase == MessageType.TRAIN else ()
        problem = self.metrics_problem(metrics, required)
        if problem:
            return user_id, problem
        if expected is None:
            return user_id, None
        if phase == MessageType.TRAIN and self.carries_reward_models:
            problem = self.reward_models.problem(content, metrics, self.arrayrecord_key)
            return user_id, problem or arrays_problem(arrays_of(content, self.arrayrecord_key), expected)
        if len(content.array_records) != 1:
            return user_id, f"expected one ArrayRecord, got {len(content.array_records)}"
        return user_id, arrays_problem(arrays_of(content, self.arrayrecord_key), expected)

    def metrics_problem(self, metrics: MetricRecord, required: Iterable[str] = ()) -> str | None:
        """Why a MetricRecord is unusable: no positive example count, a non-finite value, a
        missing required key, a reward outside [0, 1]."""
        weight = metrics.get(self.weighted_by_key)
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            return f"'{self.weighted_by_key}' missing or not a positive number: {weight!r}"
        for key, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            if not all(math.isfinite(v) for v in values):
                return f"metric '{key}' is not finite"
        for key in required:
            if key not in metrics:
                return f"metric '{key}' is missing"
        for key in (self.reward_key, f"{self.reward_key}-before"):
            if key in metrics and not 0.0 <= float(metrics[key]) <= 1.0:
                return f"metric '{key}' = {metrics[key]} is outside [0, 1]"
        return None
