"""The ServerApp's round loop, over the FeedbackFedAvg strategy.

``Strategy.start`` always begins at round 1 and offers only ``evaluate_fn``;
owning the loop (configure -> send and receive through the Grid -> aggregate
-> evaluate -> record) gives per-round checkpoints, per-user rows, traffic,
time and failure counts, one message per user per round, and later resume.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from flhf_core.common import atomic_write_json
from flhf_core.config import ConfigError
from flhf_core.data import partitions
from flhf_core.learning.model import parameters_to_record, record_nbytes, record_to_parameters
from flhf_core.protocol import EVALUATE_RECEIVED, NUM_USERS, OWN_DATA, USER_ID, USER_RECORD
from flhf_core.results.checkpoint import (
    Checkpoint,
    CheckpointError,
    PendingRound,
    save_checkpoint,
    set_rng_state,
)
from flhf_core.results.rounds import RoundReport, rejection_counts
from flhf_core.results.tracking import Tracker
from flhf_core.server import reward_models
from flhf_core.server.reporting import add_seconds, client_seconds, record_users, round_line, train_columns
from flhf_core.server.run_output import RunOutput
from flhf_core.server.state import (
    NO_GLOBAL_MODEL,
    ServerState,
    phase_learning_rate,
    round_config,
    round_learning_rate,
    server_evaluate,
)
from flhf_core.server.strategy import FeedbackFedAvg
from flhf_core.users.profiles import build_profile

IDENTIFY_SECONDS = 60.0  # how long identification waits for nodes' answers (at most the round timeout)


def is_count(value: object) -> bool:
    """A non-negative integer (not a bool) as a node's user id or number of users must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class RoundFailed(RuntimeError):
    """No training reply of a round was valid: the federation cannot go on."""


PULL_INTERVAL = 0.2  # seconds between polls for replies (Flower's deployment grid sleeps 3 s)


def exchange(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Send ``messages`` and collect their replies until all came or ``timeout`` passed.

    Flower's own ``send_and_receive`` polls the SuperLink every 3 s in deployment, up to 3 s
    lost per phase; this polls every :data:`PULL_INTERVAL`. Grids that are not Flower's (the
    in-process one) answer directly.
    """
    if not isinstance(grid, Grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting and (deadline is None or time.monotonic() < deadline):
        pulled = list(grid.pull_messages(waiting))
        replies.extend(pulled)
        waiting -= {m.metadata.reply_to_message_id for m in pulled}
        if waiting:
            time.sleep(PULL_INTERVAL)
    return replies


@dataclass
class Federation(RunOutput):
    """The round loop: configure -> send and receive -> aggregate -> evaluate -> record.

    One message per user per round: round r's training messages bring round r-1's global
    model, and the users evaluate it before training (``evaluate-received``); so round r-1's
    rows are written once round r's replies are in, and the last round's model gets one
    round of evaluate messages at the end. With ``separate-evaluation`` every evaluated
    round sends evaluate messages instead (two messages per user per round). Writing a
    completed round's rows and the run's results is :class:`~flhf_core.server.run_output.RunOutput`'s job.
    """

    grid: Grid
    state: ServerState
    tracker: Tracker
    strategy: FeedbackFedAvg
    initial: dict[str, float] = field(default_factory=dict)
    num_users: int = 0  # learned from the nodes (their num-partitions)
    own_data_users: set[int] = field(default_factory=set)  # users with their own data file
    rounds_done: int = 0
    pending: PendingRound | None = None
    evaluated: tuple[int, dict[str, float]] | None = None  # the latest round the users evaluated, its row
    failures: int = 0  # failed training replies so far
    resumed_after: list[int] = field(default_factory=list)  # rounds this run was resumed after
    recorded: ArrayRecord | None = None  # the global model of the last round completed (or round 0's)

    def run(self, resume: Checkpoint | None = None) -> None:
        """All rounds; with ``resume``, the rounds after the checkpoint's (its model is already
        the server's: see :func:`flhf_core.server.main.run_federation`)."""
        config = self.state.config
        started = time.perf_counter()
        if resume is None:
            self.evaluate_initial()
        else:
            self.initial, self.pending, self.evaluated = resume.initial, resume.pending, resume.evaluated
            self.rounds_done = resume.server_round
            self.failures = resume.failures
            history = resume.strategy_state.get("reward-history", {})
            self.strategy.reward_history = {int(u): [float(r) for r in h] for u, h in history.items()}
            shared = self.strategy.reward_models
            reward_models.check_resumable(resume.strategy_state, config.reward_model, shared is not None)
            if shared is not None:
                shared.restore(resume.strategy_state["reward-models"], resume.strategy_arrays)
            self.resumed_after = [*resume.resumed_after, resume.server_round]
            set_rng_state(resume.rng)
            log(INFO, "resuming after round %d of %d", resume.server_round, config.num_server_rounds)
        self.identify_users()
        if resume is not None and self.num_users != resume.num_users:
            raise CheckpointError(
                f"the run was checkpointed with {resume.num_users} users, and {self.num_users} now: "
                f"resume it with --users {resume.num_users} (every node's num-partitions)"
            )
        pool = self.strategy.reward_models.pool if self.strategy.reward_models else None
        if pool is not None and pool.clusters > self.num_users:
            raise ConfigError(
                f"reward-model-clusters: {pool.clusters} clusters for {self.num_users} users would leave "
                f"some empty; use at most {self.num_users}."
            )
        if resume is None:
            atomic_write_json(
                self.tracker.run_dir / "splits.json",
                partitions.splits(self.state.corpus, config, self.num_users, exclude=self.own_data_users),
            )
        arrays = self.recorded = parameters_to_record(self.state.model, self.state.shared_names)
        first = self.rounds_done + 1
        for server_round in range(first, config.num_server_rounds + 1):
            arrays, row = self.run_round(server_round, arrays)
            self.rounds_done, self.recorded = server_round, arrays
            self.failures += int(row["failures"])
            if server_round % config.checkpoint_every == 0 or server_round == config.num_server_rounds:
                self.checkpoint(server_round)
            done = server_round - first + 1
            eta = (time.perf_counter() - started) / done * (config.num_server_rounds - server_round)
            log(
                INFO,
                round_line(
                    server_round,
                    config.num_server_rounds,
                    config.phase(server_round),
                    row,
                    eta,
                    self.evaluated,
                ),
            )
        if self.pending is not None:  # the final model: one round of evaluate messages
            self.evaluate_final(arrays)
            if self.evaluated is not None and "reward" in self.evaluated[1]:
                of, figures = self.evaluated
                log(
                    INFO,
                    "round %d's model: users' reward %.3f (worst %.3f)",
                    of,
                    figures["reward"],
                    figures["reward-worst"],
                )
        self.finish()

    def evaluate_initial(self) -> None:
        """Round 0: the initial model on the held-out set, and the extractive baselines."""
        config = self.state.config
        self.initial, server_seconds = timed(server_evaluate, self.state)
        row = {**self.initial, **self.state.baselines, "server-eval-seconds": server_seconds}
        self.tracker.log(0, "init", "server", None, row)  # the users evaluate models from round 1 on
        lead = self.state.baselines[f"baseline-lead{config.lead_words}-rougeL"]
        if self.initial:
            log(
                INFO,
                "round 0: held-out rougeL %.2f (lead-%d baseline %.2f)",
                self.initial["rougeL"],
                config.lead_words,
                lead,
            )
        else:
            log(INFO, "round 0: %s", NO_GLOBAL_MODEL)

    def checkpoint(self, server_round: int) -> None:
        """``checkpoints/latest``: everything a resume after ``server_round`` needs."""
        config = self.state.config
        strategy_state = {"reward-history": {str(u): h for u, h in self.strategy.reward_history.items()}}
        if config.reward_model != "none":  # the users keep their reward models' versions
            strategy_state["reward-model-versions"] = 1
        strategy_arrays = {}
        if self.strategy.reward_models is not None:
            strategy_state["reward-models"], strategy_arrays = self.strategy.reward_models.state()
        save_checkpoint(
            self.tracker.run_dir,
            self.state.model,
            self.state.tokenizer,
            server_round=server_round,
            config=config.to_mapping(),
            pending=self.pending,
            evaluated=self.evaluated,
            initial=self.initial,
            next_learning_rate=round_learning_rate(config, min(server_round + 1, config.num_server_rounds)),
            failures=self.failures,
            num_users=self.num_users,
            resumed_after=self.resumed_after,
            strategy_state=strategy_state,
            strategy_arrays=strategy_arrays,
        )

    def exchange(self, messages: list[Message]) -> list[Message]:
        return exchange(self.grid, messages, self.state.config.round_timeout or None)

    def identify_users(self) -> None:
        """Ask every connected node not yet known which user it serves (a QUERY message).

        A node's user is bound once, here: the strategy then samples identified users only
        (never Flower's node ids) and rejects a reply naming another user. A node that does not
        answer, names a user outside the federation, or claims a user another node already
        holds serves no user (logged; asked again next round); of two new nodes claiming the
        same user, the one with the lower node id keeps it. A node that left (Flower no longer
        lists it) frees its user, so a restarted SuperNode serves its user again. The server counts each user's
        examples itself (except for users holding their own data file). All nodes must agree
        on the number of users.
        """
        self.strategy.wait_for_nodes(self.grid)
        self.strategy.identified_only = True
        connected = set(self.grid.get_node_ids())
        for node in sorted(set(self.strategy.node_users) - connected):  # gone: its user may come back
            log(
                INFO, "node %d left; user %d is free to be served again", node, self.strategy.node_users[node]
            )
            del self.strategy.node_users[node]
        unknown = sorted(connected - set(self.strategy.node_users))
        if not unknown:
            return
        messages = [
            Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in unknown
        ]
        # a node that never answers must not hold up every round: identification waits briefly
        timeout = min(self.state.config.round_timeout or IDENTIFY_SECONDS, IDENTIFY_SECONDS)
        replies = exchange(self.grid, messages, timeout)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        claims = {}
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            user = None if reply.has_error() else reply.content.config_records.get(USER_RECORD)
            if user is None or not all(is_count(user.get(key)) for key in (USER_ID, NUM_USERS)):
                log(WARNING, "node %d did not say which user it serves: asked again next round", node)
                continue
            claims[node] = user
        for node, user in sorted(claims.items()):
            if int(user[NUM_USERS]) < 1 or (self.num_users and int(user[NUM_USERS]) != self.num_users):
                log(
                    WARNING,
                    "node %d says there are %s users, the federation %d: it serves no user (every "
                    "SuperNode's num-partitions must be the same)",
                    node,
                    user[NUM_USERS],
                    self.num_users,
                )
                continue
            self.num_users = int(user[NUM_USERS])
            user_id = int(user[USER_ID])
            holders = [other for other, held in self.strategy.node_users.items() if held == user_id]
            if not 0 <= user_id < self.num_users or holders:
                why = f"held by node {holders[0]}" if holders else f"not one of the {self.num_users} users"
                log(WARNING, "node %d claims user %d, %s: it serves no user", node, user_id, why)
                continue
            self.strategy.node_users[node] = user_id
            if user.get(OWN_DATA):
                self.own_data_users.add(user_id)
        if not self.num_users:
            raise RoundFailed("no node said which user it serves (partition-id, num-partitions)")

    def complete(self, pending: PendingRound, evaluation: tuple[RoundReport, dict | None] | None) -> None:
        """Write a round's rows (see :meth:`~flhf_core.server.run_output.RunOutput.write_round`); an evaluated
        round becomes the latest evaluated one, and a pending round is pending no more."""
        row = self.write_round(pending, evaluation)
        if evaluation is not None:
            self.evaluated = (pending.server_round, row)
        if self.pending is pending:
            self.pending = None

    def finish(self, error: BaseException | None = None) -> None:
        """The run's results (:meth:`~flhf_core.server.run_output.RunOutput.write_results`); a round still
        waiting for its evaluation is written without it first: no round is lost. After a failure
        the model saved is the last completed round's, never one aggregated in the failed round."""
        if error is not None and self.recorded is not None:
            record_to_parameters(self.state.model, self.recorded, names=self.state.shared_names)
        if self.pending is not None:
            self.complete(self.pending, None)
        self.write_results(error)

    def example_counts(self, phase: str) -> Callable[[int], float | None]:
        """The server's own count of a user's examples in ``phase`` (what weights it); None for
        users it cannot count (those with their own data file)."""
        state = self.state

        def count(user: int) -> float | None:
            if not 0 <= user < self.num_users or user in self.own_data_users:
                return None
            part = partitions.user_partition(state.corpus, user, self.num_users, state.config)
            if phase == "sft":
                return float(len(part.train))
            profile = build_profile(user, state.config.user_profiles, state.corpus.aspects, state.config.seed)
            return float(
                len(partitions.judged_examples(state.corpus, part.feedback_doc_ids, profile, state.config))
            )

        return functools.lru_cache(maxsize=None)(count)

    def run_round(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, float]]:
        """One round; returns the new global parameters and the server's row of metrics.

        Raises RoundFailed if no training reply was valid."""
        started = time.perf_counter()
        config = self.state.config
        phase = config.phase(server_round)
        config_record = round_config(self.state, phase, server_round, self.tracker.run_dir.name)
        config_record[EVALUATE_RECEIVED] = self.pending is not None
        self.identify_users()  # nodes that joined since
        self.strategy.example_counts = self.example_counts(phase)
        self.strategy.reward_weighting = config.weighting(phase)
        self.strategy.server_learning_rate = config.server_learning_rate(phase)
        self.strategy.fraction_train = config.round_fraction_train(phase)
        self.strategy.reward_models_active = phase == "feedback"  # only feedback rounds judge
        self.strategy.client_learning_rate = phase_learning_rate(config, phase, server_round)

        sent = list(self.strategy.configure_train(server_round, arrays, config_record, self.grid))
        replies = self.exchange(sent)
        new_arrays, train_metrics = self.strategy.aggregate_train(server_round, replies)
        train_report = self.strategy.reports[(server_round, MessageType.TRAIN)]
        if self.pending is not None:  # the previous round's model, as these users evaluated it
            self.complete(self.pending, self.strategy.received_evaluation(server_round - 1))
        if new_arrays is None:
            reasons = "; ".join(
                f"user {r.user_id if r.user_id is not None else '?'} (node {r.node_id}): {r.reason}"
                for r in train_report.rejected
            )
            record_users(
                self.tracker, server_round, phase, train_report, RoundReport(server_round, "evaluate")
            )
            raise RoundFailed(
                f"round {server_round}: no valid training reply ({reasons or 'no reply at all'})"
            )
        traffic = {"bytes-down": parameter_bytes(sent), "bytes-up": parameter_bytes(replies)}
        previous = (
            copy.deepcopy(self.state.model)
            if config.has_global_model and config.evaluates(server_round)
            else None
        )
        arrays = new_arrays
        record_to_parameters(self.state.model, arrays, names=self.state.shared_names)
        row = {
            **train_columns(train_metrics or {}),
            "clients": len(train_report.user_metrics),
            "aggregation-step": train_report.step,
            "failures": train_report.failures,
            **rejection_counts(train_report.rejected),
            **traffic,
        }
        if config.evaluates(server_round):
            evaluated_at = time.perf_counter()
            row.update(server_evaluate(self.state, previous))
            row["server-eval-seconds"] = time.perf_counter() - evaluated_at
        row.update(client_seconds(train_report))
        pending = PendingRound(server_round, phase, row, train_report)
        if (
            config.evaluates_separately
            and config.evaluates(server_round)
            and server_round < config.num_server_rounds
        ):
            evaluation = self.send_evaluate(server_round, arrays, config_record)
            add_seconds(row, client_seconds(evaluation[0]))
            row["bytes-down"] += evaluation[2]
            row["seconds"] = time.perf_counter() - started
            self.complete(pending, evaluation[:2])
        else:
            row["seconds"] = time.perf_counter() - started
            self.pending = pending
            if not config.evaluates(server_round):
                self.complete(pending, None)
        return arrays, row

    def send_evaluate(
        self, server_round: int, arrays: ArrayRecord, config_record: ConfigRecord
    ) -> tuple[RoundReport, dict | None, int]:
        """Evaluate messages for round ``server_round``'s model: report, averages, bytes sent."""
        sent = list(self.strategy.configure_evaluate(server_round, arrays, config_record, self.grid))
        averaged = self.strategy.aggregate_evaluate(server_round, self.exchange(sent))
        report = self.strategy.reports.get(
            (server_round, MessageType.EVALUATE), RoundReport(server_round, MessageType.EVALUATE)
        )
        return report, averaged, parameter_bytes(sent)

    def evaluate_final(self, arrays: ArrayRecord) -> None:
        """The last round's model, evaluated by evaluate messages; its time counts in its row."""
        pending, started = self.pending, time.perf_counter()
        config_record = round_config(
            self.state, pending.phase, pending.server_round, self.tracker.run_dir.name
        )
        report, averaged, sent_bytes = self.send_evaluate(pending.server_round, arrays, config_record)
        add_seconds(pending.row, client_seconds(report))
        pending.row["bytes-down"] = pending.row.get("bytes-down", 0) + sent_bytes
        pending.row["seconds"] = pending.row.get("seconds", 0.0) + time.perf_counter() - started
        self.complete(pending, (report, averaged))


def timed(function: Callable, *args: object) -> tuple:
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def parameter_bytes(messages: list[Message]) -> int:
    """Bytes of every ArrayRecord the messages carry (the model, and any reward models)."""
    return sum(
        record_nbytes(record)
        for m in messages
        if not m.has_error()
        for record in m.content.array_records.values()
    )
