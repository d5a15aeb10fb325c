"""The ServerApp's work: a round loop it owns, over the FeedbackFedAvg strategy.

``Strategy.start`` always begins at round 1 and offers only ``evaluate_fn``;
owning the loop (configure -> send and receive through the Grid -> aggregate
-> evaluate -> record) gives per-round checkpoints, per-user rows, traffic and
failure counts, and later resume.

Everything that can fail on bad input (config, data, model, tokenizer) is done
before the run directory is created, so a bad run leaves nothing behind.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import data
from .config import ConfigError, RunConfig
from .metrics import baseline_scores, evaluate_model, mean_token_kl
from .model import (
    TokenizerSpec,
    add_lora,
    build_model,
    canonical_parameters,
    parameters_to_record,
    personal_parameter_names,
    record_nbytes,
    record_to_parameters,
    select_device,
    server_tokenizer,
)
from .profiles import build_profile
from .protocol import (
    LEARNING_RATE,
    NUM_USERS,
    PHASE,
    RUN_NAME,
    TOKENIZER_JSON,
    TOKENIZER_SHA256,
    USER_ID,
    USER_RECORD,
)
from .reporting import eval_columns, record_users, run_summary, train_columns, user_spread
from .strategy import FeedbackFedAvg, RoundReport
from .tracking import (
    Tracker,
    atomic_write_json,
    new_run_dir,
    plot_metrics,
    read_metrics,
    save_folder_atomically,
)

PLOTTED = ("rougeL", "rouge1", "loss", "perplexity", "train-loss", "seconds")


@dataclass
class ServerState:
    config: RunConfig
    corpus: data.Corpus
    tokenizer: PreTrainedTokenizerBase
    tokenizer_spec: TokenizerSpec
    model: PreTrainedModel  # holds the global parameters between rounds
    heldout: tuple[data.Example, ...]
    baselines: dict[str, float]
    shared_names: frozenset[str]  # what travels: everything but the clients' personal parameters

    def kl_to(self, previous: PreTrainedModel) -> float:
        """Mean per-token KL(new global || previous global) on the held-out references."""
        return mean_token_kl(self.model, previous, self.heldout_batches)

    @property
    def heldout_batches(self) -> list[data.Batch]:
        config = self.config
        return data.make_batches(
            self.tokenizer, self.heldout, 32, config.max_source_tokens, config.max_target_tokens
        )


def prepare(config: RunConfig) -> ServerState:
    """Load data, tokenizer and the initial model; raises on any bad input."""
    corpus = data.load_corpus(config)
    tokenizer, spec = server_tokenizer(config, corpus)
    model = build_model(config, tokenizer).to(select_device(config.device))
    heldout = data.heldout_examples(corpus, config)
    if not heldout:
        raise ValueError("the held-out set is empty: raise heldout-fraction")
    if not any(data.document_role(d.doc_id, config) == data.REWARD for d in corpus.documents):
        raise ConfigError(
            f"reward-fraction: {config.reward_fraction} leaves no reward documents in {len(corpus.documents)} "
            "documents; raise it (users judge the model on these to steer aggregation)."
        )
    baselines = baseline_scores(heldout, data.abstracts(corpus), config.lead_words)
    return ServerState(
        config, corpus, tokenizer, spec, model, heldout, baselines, shared_parameter_names(model, config)
    )


def shared_parameter_names(model: PreTrainedModel, config: RunConfig) -> frozenset[str]:
    """The parameters the server sends and averages; checks the personalization fits the model.

    Under ``local-head`` the server keeps its round-0 copy of the personal layers (they are
    never sent). A LoRA adapter exists only on the clients: the server's model has none.
    """
    if config.personalization == "lora":
        try:
            add_lora(copy.deepcopy(model), config.lora_rank, seed=0)
        except ValueError as error:
            raise ConfigError(f"personalization: 'lora' does not fit {config.model!r}: {error}") from None
        return frozenset(canonical_parameters(model))
    personal = personal_parameter_names(model, config.personalization, config.personal_layers)
    return frozenset(canonical_parameters(model)) - personal


def build_strategy(config: RunConfig) -> FeedbackFedAvg:
    return FeedbackFedAvg(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=config.min_available_nodes,
        reward_weighting=config.reward_weighting,
        reward_temperature=config.reward_temperature,
        max_client_weight=config.max_client_weight,
        sampling_seed=config.seed,
    )


def round_learning_rate(config: RunConfig, server_round: int) -> float:
    """The clients' learning rate in ``server_round`` (1-based).

    ``cosine`` decays from ``learning-rate`` to a tenth of it at the last round: late rounds
    then average small, consistent client updates instead of noisy ones.
    """
    if config.lr_schedule == "constant" or config.num_server_rounds == 1:
        return config.learning_rate
    progress = (server_round - 1) / (config.num_server_rounds - 1)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def round_config(state: ServerState, phase: str, server_round: int, run_name: str) -> ConfigRecord:
    """What every message of a round tells the clients besides the parameters."""
    record = ConfigRecord(
        {
            PHASE: phase,
            RUN_NAME: run_name,  # the run folder's name (a timestamp when run-name is empty)
            TOKENIZER_SHA256: state.tokenizer_spec.sha256,
            LEARNING_RATE: round_learning_rate(state.config, server_round),
        }
    )
    if state.tokenizer_spec.payload:
        record[TOKENIZER_JSON] = state.tokenizer_spec.payload
    return record


def run_federation(grid: Grid, context: Context) -> Path:
    """Run ``num-server-rounds`` rounds and write the results directory; return it.

    If a round fails (no valid training reply, or any exception), the rounds before it
    stay in metrics.jsonl, summary.json is written with ``status: failed`` and the
    reason, the last good global model is saved, and the error is raised again so that
    Flower marks the run failed.
    """
    config = RunConfig.from_mapping(context.run_config)
    state = prepare(config)  # every bad input fails here, before anything is written
    run_dir = new_run_dir(config.results_path, config.run_name)
    log(INFO, "FLHF results directory: %s", run_dir)
    tracker = Tracker(run_dir, config.to_mapping())
    federation = Federation(grid, state, tracker, build_strategy(config))
    try:
        federation.run()
    except BaseException as error:
        log(ERROR, "FLHF run failed: %s: %s", type(error).__name__, error)
        federation.finish(error)
        raise
    finally:
        tracker.close()
    log(INFO, "FLHF run finished: %s", run_dir)
    return run_dir


class RoundFailed(RuntimeError):
    """No training reply of a round was valid: the federation cannot go on."""


@dataclass
class Federation:
    """The round loop: configure -> send and receive -> aggregate -> evaluate -> record."""

    grid: Grid
    state: ServerState
    tracker: Tracker
    strategy: FeedbackFedAvg
    initial: dict[str, float] = field(default_factory=dict)
    num_users: int = 0  # learned from the nodes (their num-partitions)
    rounds_done: int = 0

    def run(self) -> None:
        config = self.state.config
        self.initial = server_evaluate(self.state)
        self.tracker.log(0, "init", "server", None, {**self.initial, **self.state.baselines})
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
        self.identify_users()
        atomic_write_json(
            self.tracker.run_dir / "splits.json", data.splits(self.state.corpus, config, self.num_users)
        )
        arrays = parameters_to_record(self.state.model, self.state.shared_names)
        started = time.perf_counter()
        for server_round in range(1, config.num_server_rounds + 1):
            arrays, row = self.run_round(server_round, arrays)
            self.rounds_done = server_round
            eta = (time.perf_counter() - started) / server_round * (config.num_server_rounds - server_round)
            log(
                INFO, round_line(server_round, config.num_server_rounds, config.phase(server_round), row, eta)
            )
        self.finish()

    def exchange(self, messages: list[Message]) -> list[Message]:
        return list(self.grid.send_and_receive(messages, timeout=self.state.config.round_timeout or None))

    def identify_users(self) -> None:
        """Ask every connected node not yet known which user it serves (a QUERY message).

        The strategy then samples users instead of node ids, and the server counts each
        user's examples itself. A node that does not answer stays unknown (and unsampled
        while others are known); all nodes must agree on the number of users.
        """
        self.strategy.wait_for_nodes(self.grid)
        unknown = sorted(set(self.grid.get_node_ids()) - set(self.strategy.node_users))
        if not unknown:
            return
        messages = [
            Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in unknown
        ]
        for reply in self.exchange(messages):
            user = None if reply.has_error() else reply.content.config_records.get(USER_RECORD)
            if (
                user is None
                or not isinstance(user.get(USER_ID), int)
                or not isinstance(user.get(NUM_USERS), int)
            ):
                log(WARNING, "node %d did not say which user it serves", reply.metadata.src_node_id)
                continue
            if self.num_users and int(user[NUM_USERS]) != self.num_users:
                raise RoundFailed(
                    f"node {reply.metadata.src_node_id} says there are {user[NUM_USERS]} users, others "
                    f"{self.num_users}: every SuperNode's num-partitions must be the same"
                )
            self.num_users = int(user[NUM_USERS])
            self.strategy.node_users[reply.metadata.src_node_id] = int(user[USER_ID])
        if not self.num_users:
            raise RoundFailed("no node said which user it serves (partition-id, num-partitions)")

    def example_counts(self, phase: str) -> Callable[[int], float | None]:
        """The server's own count of a user's examples in ``phase`` (what weights it)."""
        state = self.state

        def count(user: int) -> float | None:
            if not 0 <= user < self.num_users:
                return None
            part = data.user_partition(state.corpus, user, self.num_users, state.config)
            if phase == "sft":
                return float(len(part.train))
            profile = build_profile(user, state.config.user_profiles, state.corpus.aspects, state.config.seed)
            return float(len(data.aspect_examples(state.corpus, part.feedback_doc_ids, profile.aspect)))

        return functools.lru_cache(maxsize=None)(count)

    def run_round(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, float]]:
        """One round; returns the new global parameters and the server's row of metrics.

        Raises RoundFailed if no training reply was valid."""
        started = time.perf_counter()
        phase = self.state.config.phase(server_round)
        config_record = round_config(self.state, phase, server_round, self.tracker.run_dir.name)
        self.identify_users()  # nodes that joined since
        self.strategy.example_counts = self.example_counts(phase)

        sent = list(self.strategy.configure_train(server_round, arrays, config_record, self.grid))
        replies = self.exchange(sent)
        new_arrays, train_metrics = self.strategy.aggregate_train(server_round, replies)
        train_report = self.strategy.reports[(server_round, MessageType.TRAIN)]
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
        traffic = {"bytes-down": record_nbytes(arrays) * len(sent), "bytes-up": uploaded_bytes(replies)}
        previous = copy.deepcopy(self.state.model) if self.state.config.has_global_model else None
        arrays = new_arrays
        record_to_parameters(self.state.model, arrays, names=self.state.shared_names)
        drift = {"kl-to-previous": self.state.kl_to(previous)} if previous is not None else {}

        sent = list(self.strategy.configure_evaluate(server_round, arrays, config_record, self.grid))
        traffic["bytes-down"] += record_nbytes(arrays) * len(sent)  # evaluation messages carry the model too
        client_eval = self.strategy.aggregate_evaluate(server_round, self.exchange(sent))
        heldout = server_evaluate(self.state)
        seconds = time.perf_counter() - started

        eval_report = self.strategy.reports.get(
            (server_round, MessageType.EVALUATE), RoundReport(server_round, MessageType.EVALUATE)
        )
        record_users(self.tracker, server_round, phase, train_report, eval_report)
        server_row = {
            **heldout,
            **train_columns(train_metrics or {}),
            **{f"client-{k}": v for k, v in eval_columns(client_eval or {}).items()},
            "clients": len(train_report.user_metrics),
            "failures": train_report.failures,
            **traffic,
            **drift,
            **user_spread(eval_report.user_metrics),
            "seconds": seconds,
        }
        self.tracker.log(server_round, phase, "server", None, server_row)
        save_checkpoint(self.tracker.run_dir, self.state, server_round)
        return arrays, server_row

    def finish(self, error: BaseException | None = None) -> None:
        """summary.json, the final model (where there is one) and plots; on failure, marked failed."""
        run_dir, state = self.tracker.run_dir, self.state

        def save(folder: Path) -> None:
            state.model.save_pretrained(folder)
            state.tokenizer.save_pretrained(folder)

        if state.config.has_global_model:
            save_folder_atomically(run_dir / "model", save)  # on failure: the last good global model
        rows = read_metrics(self.tracker.metrics_path)
        summary = run_summary(rows, state.config.to_mapping(), state.baselines, self.initial)
        summary["status"] = "completed" if error is None else "failed"
        if error is not None:
            summary["error"] = f"{type(error).__name__}: {error}"
            summary["failed-in-round"] = self.rounds_done + 1
        if state.config.has_global_model:
            summary["model-dir"] = str(run_dir / "model")
        else:
            summary["global-model"] = NO_GLOBAL_MODEL
        self.tracker.write_summary(summary)
        plot_metrics(rows, run_dir / "plots", PLOTTED)


NO_GLOBAL_MODEL = (
    "none: under personalization=local-head each user keeps its own LM head and last decoder "
    "block(s), so no complete global model exists; see reward-personal and rougeL-personal"
)


def round_line(server_round: int, rounds: int, phase: str, row: Mapping[str, float], eta: float) -> str:
    """The per-round log line: held-out figures (where there is a global model), users, time, ETA."""
    parts = [f"round {server_round}/{rounds} [{phase}]"]
    if "rougeL" in row:
        parts.append(f"held-out rougeL {row['rougeL']:.2f} loss {row['loss']:.3f}")
    if "reward" in row:
        parts.append(f"reward {row['reward']:.3f} (worst {row['reward-worst']:.3f})")
    if "reward-personal" in row:
        parts.append(f"personal reward {row['reward-personal']:.3f}")
    parts.append(f"clients {row['clients']}, failures {row['failures']}")
    parts.append(f"{row['seconds']:.1f}s, ETA {eta:.0f}s")
    return " | ".join(parts)


def uploaded_bytes(replies: list[Message]) -> int:
    """Parameter bytes the clients sent back."""
    return sum(
        record_nbytes(r.content["arrays"]) for r in replies if not r.has_error() and "arrays" in r.content
    )


def server_evaluate(state: ServerState) -> dict[str, float]:
    """The global model on the server's held-out examples (none without a global model)."""
    if not state.config.has_global_model:
        return {}
    return evaluate_model(state.model, state.tokenizer, state.heldout, state.config)


def save_checkpoint(run_dir: Path, state: ServerState, server_round: int) -> None:
    """The global model after ``server_round`` (``save_pretrained``, safetensors)."""

    def save(folder: Path) -> None:
        state.model.save_pretrained(folder)
        state.tokenizer.save_pretrained(folder)
        (folder / "round.txt").write_text(f"{server_round}\n")

    save_folder_atomically(run_dir / "checkpoints" / "latest", save)
