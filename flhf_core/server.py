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
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType
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
from .strategy import FeedbackFedAvg, RoundReport
from .tracking import Tracker, new_run_dir, plot_metrics, read_metrics, save_folder_atomically

PLOTTED = ("rougeL", "rouge1", "loss", "perplexity", "train-loss", "seconds")


@dataclass
class ServerState:
    config: RunConfig
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
    baselines = baseline_scores(heldout, data.abstracts(corpus), config.lead_words)
    return ServerState(
        config, tokenizer, spec, model, heldout, baselines, shared_parameter_names(model, config)
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
            "phase": phase,
            "run-name": run_name,  # the run folder's name (a timestamp when run-name is empty)
            "tokenizer-sha256": state.tokenizer_spec.sha256,
            "learning-rate": round_learning_rate(state.config, server_round),
        }
    )
    if state.tokenizer_spec.payload:
        record["tokenizer-json"] = state.tokenizer_spec.payload
    return record


def run_federation(grid: Grid, context: Context) -> Path:
    """Run ``num-server-rounds`` rounds and write the results directory; return it."""
    config = RunConfig.from_mapping(context.run_config)
    state = prepare(config)  # every bad input fails here, before anything is written
    run_dir = new_run_dir(config.results_path, config.run_name)
    log(INFO, "FLHF results directory: %s", run_dir)
    tracker = Tracker(run_dir, config.to_mapping())
    try:
        Federation(grid, state, tracker, build_strategy(config)).run()
    finally:
        tracker.close()
    log(INFO, "FLHF run finished: %s", run_dir)
    return run_dir


@dataclass
class Federation:
    """The round loop: configure -> send and receive -> aggregate -> evaluate -> record."""

    grid: Grid
    state: ServerState
    tracker: Tracker
    strategy: FeedbackFedAvg

    def run(self) -> None:
        config = self.state.config
        initial = server_evaluate(self.state)
        self.tracker.log(0, "init", "server", None, {**initial, **self.state.baselines})
        lead = self.state.baselines[f"baseline-lead{config.lead_words}-rougeL"]
        log(
            INFO,
            "round 0: held-out rougeL %.2f (lead-%d baseline %.2f)",
            initial["rougeL"],
            config.lead_words,
            lead,
        )
        arrays = parameters_to_record(self.state.model, self.state.shared_names)
        for server_round in range(1, config.num_server_rounds + 1):
            arrays = self.run_round(server_round, arrays)
        finish(self.tracker.run_dir, self.tracker, self.state, initial)

    def exchange(self, messages: list[Message]) -> list[Message]:
        return list(self.grid.send_and_receive(messages, timeout=self.state.config.round_timeout or None))

    def run_round(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """One round; returns the new global parameters (unchanged if no reply was valid)."""
        started = time.perf_counter()
        phase = self.state.config.phase(server_round)
        config_record = round_config(self.state, phase, server_round, self.tracker.run_dir.name)

        sent = list(self.strategy.configure_train(server_round, arrays, config_record, self.grid))
        replies = self.exchange(sent)
        new_arrays, train_metrics = self.strategy.aggregate_train(server_round, replies)
        traffic = {"bytes-down": record_nbytes(arrays) * len(sent), "bytes-up": uploaded_bytes(replies)}
        drift: dict[str, float] = {}
        if new_arrays is None:
            log(WARNING, "round %d: no valid training reply; the global model is unchanged", server_round)
        else:
            previous = copy.deepcopy(self.state.model)
            arrays = new_arrays
            record_to_parameters(self.state.model, arrays, names=self.state.shared_names)
            drift = {"kl-to-previous": self.state.kl_to(previous)}

        sent = list(self.strategy.configure_evaluate(server_round, arrays, config_record, self.grid))
        traffic["bytes-down"] += record_nbytes(arrays) * len(sent)  # evaluation messages carry the model too
        client_eval = self.strategy.aggregate_evaluate(server_round, self.exchange(sent))
        heldout = server_evaluate(self.state)
        seconds = time.perf_counter() - started

        train_report = self.strategy.reports[(server_round, MessageType.TRAIN)]
        eval_report = self.strategy.reports[(server_round, MessageType.EVALUATE)]
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
        reward = (
            f" | reward {server_row['reward']:.3f} (worst {server_row['reward-worst']:.3f})"
            if "reward" in server_row
            else ""
        )
        log(
            INFO,
            "round %d/%d [%s] held-out rougeL %.2f loss %.3f%s | clients %d, failures %d | %.1fs",
            server_round,
            self.state.config.num_server_rounds,
            phase,
            heldout["rougeL"],
            heldout["loss"],
            reward,
            len(train_report.user_metrics),
            train_report.failures,
            seconds,
        )
        return arrays


def user_spread(user_metrics: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Fairness across users: mean (and factors), worst, best and spread of the global model's reward."""
    rewards = [m["reward"] for m in user_metrics.values() if "reward" in m]
    if not rewards:
        return {}
    win_rates = [m["win-rate"] for m in user_metrics.values() if "win-rate" in m]
    components = {
        key: float(np.mean([m[key] for m in user_metrics.values() if key in m]))
        for key in ("reward-content", "reward-length", "reward-keywords")
        if any(key in m for m in user_metrics.values())
    }
    return {
        "reward": float(np.mean(rewards)),
        **components,
        "reward-worst": float(np.min(rewards)),
        "reward-best": float(np.max(rewards)),
        "reward-std": float(np.std(rewards)),
        **({"win-rate": float(np.mean(win_rates))} if win_rates else {}),
        **personal_spread(user_metrics),
    }


def personal_spread(user_metrics: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Personalized models: mean and worst-user reward, and the gain over the global model."""
    personal = [m for m in user_metrics.values() if "reward-personal" in m]
    if not personal:
        return {}
    return {
        "reward-personal": float(np.mean([m["reward-personal"] for m in personal])),
        "reward-personal-worst": float(np.min([m["reward-personal"] for m in personal])),
        "personalization-gain": float(np.mean([m["personalization-gain"] for m in personal])),
        "personalization-gain-worst": float(np.min([m["personalization-gain"] for m in personal])),
        "users-helped": float(np.mean([m["personalization-gain"] > 0 for m in personal])),
    }


def uploaded_bytes(replies: list[Message]) -> int:
    """Parameter bytes the clients sent back."""
    return sum(
        record_nbytes(r.content["arrays"]) for r in replies if not r.has_error() and "arrays" in r.content
    )


def server_evaluate(state: ServerState) -> dict[str, float]:
    """The global model on the server's held-out examples."""
    return evaluate_model(state.model, state.tokenizer, state.heldout, state.config)


def train_columns(metrics: Mapping[str, float]) -> dict[str, float]:
    """A training reply's metrics as metrics.jsonl columns (all prefixed ``train-``)."""
    return {
        "train-examples" if k == "num-examples" else k if k.startswith("train-") else f"train-{k}": v
        for k, v in metrics.items()
    }


def eval_columns(metrics: Mapping[str, float]) -> dict[str, float]:
    """An evaluation reply's metrics as columns (``num-examples`` becomes ``eval-examples``)."""
    return {"eval-examples" if k == "num-examples" else k: v for k, v in metrics.items()}


def record_users(
    tracker: Tracker, server_round: int, phase: str, train: RoundReport, evaluation: RoundReport
) -> None:
    """One row per user: its training figures and its validation figures."""
    for user in sorted(train.user_metrics.keys() | evaluation.user_metrics.keys()):
        row = train_columns(train.user_metrics.get(user, {}))
        row.update(eval_columns(evaluation.user_metrics.get(user, {})))
        if user in train.weights:
            row["aggregation-weight"] = train.weights[user]
        tracker.log(server_round, phase, "client", user, row)
    for rejection in train.rejected + evaluation.rejected:
        tracker.log(
            server_round,
            phase,
            "client",
            rejection.user_id,
            {"failed": 1, "node-id": rejection.node_id, "reason": rejection.reason},
        )


def save_checkpoint(run_dir: Path, state: ServerState, server_round: int) -> None:
    """The global model after ``server_round`` (``save_pretrained``, safetensors)."""

    def save(folder: Path) -> None:
        state.model.save_pretrained(folder)
        state.tokenizer.save_pretrained(folder)
        (folder / "round.txt").write_text(f"{server_round}\n")

    save_folder_atomically(run_dir / "checkpoints" / "latest", save)


def reward_summary(server_rows: list[dict], sft_rounds: int) -> dict[str, float]:
    """The global model's reward at the end, and when the supervised rounds ended."""
    if not server_rows or "reward" not in server_rows[-1]:
        return {}
    final = server_rows[-1]
    keys = (
        "reward",
        "reward-worst",
        "reward-std",
        "win-rate",
        "reward-personal",
        "reward-personal-worst",
        "personalization-gain",
        "personalization-gain-worst",
        "users-helped",
    )
    summary = {key: final[key] for key in keys if key in final}
    supervised = [r for r in server_rows if r["phase"] == "sft" and r["round"] <= sft_rounds]
    if supervised and len(supervised) < len(server_rows):
        summary["reward-after-sft"] = supervised[-1]["reward"]
        summary["reward-worst-after-sft"] = supervised[-1]["reward-worst"]
        summary["reward-gain-from-feedback"] = final["reward"] - supervised[-1]["reward"]
    return summary


def finish(run_dir: Path, tracker: Tracker, state: ServerState, initial: dict[str, float]) -> None:
    """Final model, summary.json and plots."""

    def save(folder: Path) -> None:
        state.model.save_pretrained(folder)
        state.tokenizer.save_pretrained(folder)

    save_folder_atomically(run_dir / "model", save)
    rows = read_metrics(tracker.metrics_path)
    server_rows = [r for r in rows if r["scope"] == "server" and r["round"] > 0]
    final = server_rows[-1] if server_rows else {}
    lead_key = f"baseline-lead{state.config.lead_words}-rougeL"
    summary = {
        "rounds": len(server_rows),
        "rougeL": final.get("rougeL"),
        "rouge1": final.get("rouge1"),
        "rouge2": final.get("rouge2"),
        "loss": final.get("loss"),
        "perplexity": final.get("perplexity"),
        "rougeL-round0": initial["rougeL"],
        "rougeL-vs-round0": (final.get("rougeL") or 0.0) / max(initial["rougeL"], 1e-9),
        "rougeL-minus-lead-baseline": (final.get("rougeL") or 0.0) - state.baselines[lead_key],
        **state.baselines,
        "failures": sum(r.get("failures", 0) for r in server_rows),
        "bytes-up": sum(r.get("bytes-up", 0) for r in server_rows),
        "bytes-down": sum(r.get("bytes-down", 0) for r in server_rows),
        "seconds": sum(r.get("seconds", 0.0) for r in server_rows),
        "train-tokens-per-second": final.get("train-tokens-per-second"),
        **reward_summary(server_rows, state.config.sft_rounds),
        "model-dir": str(run_dir / "model"),
    }
    tracker.write_summary(summary)
    plot_metrics(rows, run_dir / "plots", PLOTTED)
