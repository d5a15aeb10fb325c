"""FeedbackFedAvg: Flower's FedAvg that distrusts replies and knows its users.

Differences from :class:`flwr.serverapp.strategy.FedAvg`, each for a reason:

* Sampling is seeded (FedAvg uses Python's global ``random``) and waits for
  nodes at most ``node_wait_timeout`` seconds (FedAvg waits forever). Once the
  owner has told it which user each node serves (:attr:`node_users`), it samples
  users, not Flower's random node ids: the same seed picks the same users in
  every run, in simulation and deployment alike.
* Replies are screened before aggregation instead of raising
  ``InconsistentMessageReplies`` (which ends the run): error replies, missing
  records or keys, arrays whose names, shapes or dtypes differ from the global
  model's, and non-finite values are rejected, logged, and counted; valid
  replies are sorted by user before averaging, so float sums do not depend on
  arrival order; each reply's metrics are kept per user (an aggregated
  MetricRecord would average the user id too). A reply that names no user (any
  Flower ClientApp) is known by its node id. (:class:`~flhf_core.server.screening.ReplyScreening`.)
* Client weights come from :func:`flhf_core.server.aggregation.client_weights`;
  with ``reward_weighting="none"`` the result equals FedAvg's bit for bit.
  Where the owner knows how many examples each user holds
  (:attr:`example_counts`), that count replaces the one a reply claims.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from flhf_core.protocol import CLUSTER_OF_USER, EVALUATION, SERVER_ROUND
from flhf_core.results.rounds import RoundReport
from flhf_core.server.aggregation import (
    REWARD_SHORTFALL,
    average_metrics,
    client_weights,
    qffl_shares,
    reward_history_means,
    squared_distance,
    weighted_average,
    weighting_counts,
)
from flhf_core.server.replies import (
    Signature,
    lists,
    majority_signature,
    own_metrics,
    scalars,
    signature,
)
from flhf_core.server.reward_models import RewardModelExchange
from flhf_core.server.screening import ReplyScreening, reject

REWARD_MODEL_FIGURES = "reward-model-"  # diagnostics averaged over the replies that have them


class FeedbackFedAvg(ReplyScreening, FedAvg):
    """FedAvg with reward-aware client weights and screened replies.

    Parameters (besides FedAvg's)
    -----------------------------
    reward_key : str
        The MetricRecord key holding a client's reward in [0, 1].
    reward_weighting : str
        ``"none"`` aggregates exactly as FedAvg; ``linear``, ``softmax`` and ``gain``
        and ``history`` fold the reward in (see :func:`flhf_core.server.aggregation.client_weights`;
        ``history`` keeps each user's past rewards in :attr:`reward_history`); ``qfedavg``
        is q-FFL on the train loss, as Flower's ``QFedAvg`` (:func:`~flhf_core.server.aggregation.qffl_shares`).
        A reply without the metric the mode needs, or with a reward outside [0, 1], is
        rejected. The owner may change it between rounds (FLHF weights feedback rounds only).
    reward_temperature : float
        Temperature of the ``softmax`` weighting; negative favours low rewards.
    max_client_weight : float
        Cap on any client's share of the average.
    sampling_seed : int
        Seeds sampling (per round and phase).
    node_wait_timeout : float
        Seconds to wait for ``min_available_nodes`` before giving up.
    q, client_learning_rate, train_loss_key :
        ``qfedavg``: the fairness exponent, the clients' learning rate (L = 1 / it) and the
        reply's loss key F_k, as Flower's ``QFedAvg`` names them. FLHF's ServerApp sets the
        key to ``reward-shortfall``: F_k = 1 - reward-before, the received model's shortfall
        on the user's fresh documents (bounded in [0, 1], meaningful in feedback rounds,
        where a policy-gradient surrogate "loss" is near 0 or negative).
    server_learning_rate : float
        How far the new global model moves from the one sent towards the clients' average:
        theta <- theta + eta (average - theta) (the server learning rate of FedOpt, Reddi et al.,
        2021, https://arxiv.org/abs/2003.00295, with plain SGD on the server); 1 is FedAvg. The
        owner may change it between rounds (FLHF damps feedback rounds only).
    train_users : Collection[int] | None
        Only these users train (centralized mode: one learner); None = sample every user.
    reward_models : RewardModelExchange | None
        The users' shared reward models (``reward-model = federated | clustered``). In rounds
        where the owner sets :attr:`reward_models_active`, each training message also carries
        every reward model and the user's cluster, each training reply must carry the user's
        reward model (a second ArrayRecord, screened like the first), and the pool folds them
        in (:mod:`flhf_core.server.reward_models`).

    Attributes the owner may set
    ----------------------------
    node_users : dict[int, int]
        Node id -> user id, bound once (by the owner, or by a node's first valid reply). An
        owner that asks every node first (as FLHF's ServerApp does) makes sampling choose
        among users.
    identified_only : bool
        Sample only nodes whose user is known (FLHF's ServerApp, which identifies every node,
        sets it): an unidentified node is logged and left out, never sampled by its node id.
    reward_models_active : bool
        Whether this round's training messages carry the reward models (FLHF: feedback rounds).
    example_counts : Callable[[int], float | None] | None
        The owner's own count of a user's examples this round. When it returns a number,
        that number weights the user, whatever the reply claims: a client cannot take the
        average by claiming a billion examples.
    """

    def __init__(
        self,
        *,
        reward_key: str = "reward",
        reward_weighting: str = "none",
        reward_temperature: float = 1.0,
        max_client_weight: float = 1.0,
        sampling_seed: int = 0,
        node_wait_timeout: float = 300.0,
        q: float = 0.1,
        client_learning_rate: float = 1e-3,
        train_loss_key: str = "train-loss",
        server_learning_rate: float = 1.0,
        train_users: Collection[int] | None = None,
        reward_models: RewardModelExchange | None = None,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.reward_key = reward_key
        self.reward_weighting = reward_weighting
        self.reward_temperature = reward_temperature
        self.max_client_weight = max_client_weight
        self.sampling_seed = sampling_seed
        self.node_wait_timeout = node_wait_timeout
        self.q = q
        self.client_learning_rate = client_learning_rate
        self.train_loss_key = train_loss_key
        self.server_learning_rate = server_learning_rate
        self.train_users = train_users
        self.reward_models = reward_models
        self.reward_models_active = False  # the owner turns it on for feedback rounds
        # user -> the reward-before of each of its valid training replies (all rounds), for "history"
        self.reward_history: dict[int, list[float]] = {}
        self.reports: dict[tuple[int, str], RoundReport] = {}
        # evaluations carried by training replies, by round evaluated
        self.received: dict[int, RoundReport] = {}
        self.node_users: dict[int, int] = {}  # node id -> user id (to sample users and name failed nodes)
        self.identified_only = False  # the owner identifies every node: sample identified users only
        self.example_counts: Callable[[int], float | None] | None = None
        self._sent: dict[tuple[int, str], list[Message]] = {}
        self.decoded: dict[int, dict[str, np.ndarray]] = {}  # screening's decode of the valid replies
        self.decoded_reward_models: dict[int, dict[str, np.ndarray]] = {}
        self._global_signature: Signature | None = None  # of the last arrays sent or aggregated

    # ------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------
    def wait_for_nodes(self, grid: Grid, minimum: int = 0) -> list[int]:
        """Connected node ids (sorted) once at least ``min_available_nodes`` (and ``minimum``)
        are connected; raises TimeoutError after ``node_wait_timeout`` seconds."""
        deadline = time.monotonic() + self.node_wait_timeout
        needed = max(self.min_available_nodes, minimum)
        while len(nodes := sorted(grid.get_node_ids())) < needed:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} nodes connected after {self.node_wait_timeout:.0f}s; "
                    f"{needed} are required (min-available-nodes)"
                )
            log(INFO, "Waiting for nodes: %d connected, %d required", len(nodes), needed)
            time.sleep(1.0)
        return nodes

    def sample(self, grid: Grid, server_round: int, phase: str, fraction: float, minimum: int) -> list[int]:
        """Seeded sample of connected nodes; waits at most ``node_wait_timeout``.

        When every connected node's user is known, the sample is drawn over user ids, so
        it does not depend on the node ids Flower drew for this run. With ``train_users``
        only those users train (an unidentified learner is an error, never a random node).
        """
        nodes = self.wait_for_nodes(grid, minimum)
        if self.identified_only:
            unidentified = [node for node in nodes if node not in self.node_users]
            if unidentified:
                log(
                    WARNING,
                    "round %d: nodes %s serve no identified user: not sampled",
                    server_round,
                    unidentified,
                )
            nodes = [node for node in nodes if node in self.node_users]
        size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
        rng = random.Random(f"{self.sampling_seed}/{phase}/{server_round}")
        if phase == MessageType.TRAIN and self.train_users is not None:
            node_of = {self.node_users[node]: node for node in nodes if node in self.node_users}
            missing = sorted(set(self.train_users) - set(node_of))
            if missing:
                raise TimeoutError(f"the learner(s) {missing} have not said which node serves them")
            return sorted(node_of[user] for user in self.train_users)
        if all(node in self.node_users for node in nodes):
            node_of = {self.node_users[node]: node for node in nodes}
            return sorted(node_of[user] for user in rng.sample(sorted(node_of), size))
        return sorted(rng.sample(nodes, size))

    def _configure(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, phase: str
    ) -> list[Message]:
        is_train = phase == MessageType.TRAIN
        fraction = self.fraction_train if is_train else self.fraction_evaluate
        if fraction == 0.0:
            return []
        minimum = self.min_train_nodes if is_train else self.min_evaluate_nodes
        node_ids = self.sample(grid, server_round, phase, fraction, minimum)
        log(INFO, "configure_%s: sampled %d nodes", phase, len(node_ids))
        config[SERVER_ROUND] = server_round
        if is_train:
            self._global_signature = signature(arrays)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        if is_train and self.carries_reward_models:
            messages = self._with_reward_models(record, node_ids)
        else:
            messages = list(self._construct_messages(record, node_ids, phase))
        self._sent[(server_round, phase)] = messages
        self.reports[(server_round, phase)] = RoundReport(server_round, phase, list(node_ids))
        return messages

    def _with_reward_models(self, record: RecordDict, node_ids: list[int]) -> list[Message]:
        """One training message per node, with the reward models (see :mod:`flhf_core.server.reward_models`)."""
        unknown = [node for node in node_ids if node not in self.node_users]
        if unknown:  # a cluster belongs to a user; a node's id changes between runs
            raise ValueError(f"reward models go to known users: nodes {unknown} have not said whose they are")
        return self.reward_models.messages(record, {node: self.node_users[node] for node in node_ids})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._configure(server_round, arrays, config, grid, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._configure(server_round, arrays, config, grid, MessageType.EVALUATE)

    def _expected_signature(self, server_round: int, replies: list[Message]) -> Signature | None:
        """What a training reply's parameters must look like.

        The arrays this strategy sent this round, else the last global arrays it saw; when
        it has seen none (its owner sent the messages), the signature most replies share.
        """
        sent = self._sent.get((server_round, MessageType.TRAIN))
        if sent:
            return signature(sent[0].content[self.arrayrecord_key])
        if self._global_signature is not None:
            return self._global_signature
        return majority_signature(replies, self.arrayrecord_key)

    # ------------------------------------------------------------------
    # Aggregation
    # ------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted average of the valid replies' parameters and metrics."""
        replies = list(replies)
        expected = self._expected_signature(server_round, replies)
        if self.carries_reward_models:
            self.reward_models.expect(replies)
        valid = self.screen(server_round, replies, MessageType.TRAIN, expected or {})
        if not valid:
            return None, None
        contents = [content for _, content in valid]
        counts = self._weighting_counts(valid)
        rewards = [self._metric(c, self.reward_key) for c in contents]
        for user_id, content in valid:  # every round: how well the federation has served each user
            before = own_metrics(content).get(f"{self.reward_key}-before")
            if before is not None:
                self.reward_history.setdefault(user_id, []).append(float(before))
        if self.reward_weighting == "history":
            rewards = reward_history_means(self.reward_history, [user_id for user_id, _ in valid])
        if self.reward_weighting == "qfedavg":
            weights = self._qffl_weights(server_round, valid)
        else:
            weights = client_weights(
                counts,
                self.reward_weighting,
                rewards=rewards,
                rewards_before=[self._metric(c, f"{self.reward_key}-before") for c in contents],
                temperature=self.reward_temperature,
                max_weight=self.max_client_weight,
            )
        report = self.reports[(server_round, MessageType.TRAIN)]
        report.weights = {user_id: w for (user_id, _), w in zip(valid, weights, strict=True)}
        self._collect_received_evaluations(report, valid)
        arrays = weighted_average([self.decoded[user_id] for user_id, _ in valid], weights)
        if self.reward_weighting == "qfedavg":  # q-FFL's step keeps the rest on the global model
            sent = self._sent_arrays(server_round)
            arrays = weighted_average([sent, arrays], [1.0 - float(sum(weights)), 1.0])
            report.step = float(sum(weights))
        if self.server_learning_rate != 1.0:  # part of the way from the global model to the average
            eta = self.server_learning_rate
            arrays = weighted_average([self._sent_arrays(server_round), arrays], [1.0 - eta, eta])
            report.step *= eta
        aggregated = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        self._global_signature = signature(aggregated)
        metrics = self._average_metrics([own_metrics(c) for c in contents], counts)
        if self.carries_reward_models:
            metrics.pop(CLUSTER_OF_USER, None)  # a cluster index is no figure to average
            metrics.update(
                self.reward_models.fold(server_round, valid, own_metrics, self.decoded_reward_models)
            )
        return aggregated, metrics

    def _sent_arrays(self, server_round: int) -> dict[str, np.ndarray]:
        sent = self._sent.get((server_round, MessageType.TRAIN))
        if not sent:
            raise ValueError("qfedavg steps from the global model: call configure_train first")
        return {k: a.numpy() for k, a in sent[0].content[self.arrayrecord_key].items()}

    def _qffl_weights(self, server_round: int, valid: list[tuple[int, RecordDict]]) -> list[float]:
        """q-FFL's shares of the valid replies (see :func:`flhf_core.server.aggregation.qffl_shares`)."""
        sent = self._sent_arrays(server_round)
        distances = [squared_distance(self.decoded[user_id], sent) for user_id, _ in valid]
        contents = [content for _, content in valid]
        if self.train_loss_key == REWARD_SHORTFALL:
            losses = [1.0 - self._metric(c, f"{self.reward_key}-before") for c in contents]
        else:
            losses = [self._metric(c, self.train_loss_key) for c in contents]
        return qffl_shares(distances, losses, self.q, self.client_learning_rate)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = self.screen(server_round, replies, MessageType.EVALUATE, None)
        return self._average_metrics([own_metrics(content) for _, content in valid]) if valid else None

    def _collect_received_evaluations(self, train: RoundReport, valid: list[tuple[int, RecordDict]]) -> None:
        """The evaluations of the previous round's model that valid training replies carry.

        They form the evaluation report of round ``server_round - 1`` (sampled: the users
        sampled for training), read with :meth:`received_evaluation`. A reply without one
        counts as a failure of that evaluation.
        """
        records = [(u, c.metric_records[EVALUATION]) for u, c in valid if EVALUATION in c.metric_records]
        if not records:
            return
        report = RoundReport(train.server_round - 1, MessageType.EVALUATE, list(train.sampled_nodes))
        node_of = {user: node for node, user in self.node_users.items()}
        for user_id, metrics in records:
            problem = self.metrics_problem(metrics)
            if problem:
                reject(
                    report,
                    node_of.get(user_id, -1),
                    user_id,
                    replace(problem, reason=f"evaluation: {problem.reason}"),
                )
            else:
                report.user_metrics[user_id] = scalars(metrics)
                report.user_lists[user_id] = lists(metrics)
        self.received[train.server_round - 1] = report

    def received_evaluation(self, evaluated_round: int) -> tuple[RoundReport, MetricRecord | None] | None:
        """Round ``evaluated_round``'s model as the next round's training replies evaluated it:
        the report (per-user figures) and the example-weighted averages; None if none came."""
        report = self.received.pop(evaluated_round, None)
        if report is None:
            return None
        metrics = [MetricRecord(m) for m in report.user_metrics.values()]
        return report, (self._average_metrics(metrics) if metrics else None)

    def _weighting_counts(self, valid: list[tuple[int, RecordDict]]) -> list[float]:
        """The example count that weights each valid reply: :attr:`example_counts` where the
        owner has one, else the reply's claim (:func:`~flhf_core.server.aggregation.weighting_counts`)."""
        claims = [float(own_metrics(c)[self.weighted_by_key]) for _, c in valid]
        counted = [self.example_counts(u) if self.example_counts is not None else None for u, _ in valid]
        return weighting_counts(claims, counted)

    @staticmethod
    def _metric(content: RecordDict, key: str) -> float:
        return float(own_metrics(content).get(key, 0.0))

    def _average_metrics(
        self, records: list[MetricRecord], counts: list[float] | None = None
    ) -> MetricRecord:
        """Example-weighted means (:func:`~flhf_core.server.aggregation.average_metrics`); a learned
        reward model's diagnostics, which a user who has judged nothing yet cannot give, over
        the records that carry them."""
        counts = counts or [float(r[self.weighted_by_key]) for r in records]
        figures = [{k: v for k, v in r.items() if k != self.weighted_by_key} for r in records]
        return MetricRecord(average_metrics(figures, counts, partial_prefix=REWARD_MODEL_FIGURES))
