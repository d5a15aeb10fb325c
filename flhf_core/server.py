"""The ServerApp's work: a round loop it owns, over the FeedbackFedAvg strategy.

``Strategy.start`` always begins at round 1 and offers only ``evaluate_fn``;
owning the loop (configure -> send and receive through the Grid -> aggregate
-> evaluate -> record) gives per-round checkpoints, per-user rows, traffic and
failure counts, and later resume.

Everything that can fail on bad input (config, data, model, tokenizer) is done
before the run directory is created, so a bad run leaves nothing behind.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, MessageType
from flwr.serverapp import Grid
from flwr.supercore import log
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import data
from .config import RunConfig
from .metrics import baseline_scores, evaluate_model
from .model import (
    TokenizerSpec,
    build_model,
    parameters_to_record,
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


def prepare(config: RunConfig) -> ServerState:
    """Load data, tokenizer and the initial model; raises on any bad input."""
    corpus = data.load_corpus(config)
    tokenizer, spec = server_tokenizer(config, corpus)
    model = build_model(config, tokenizer).to(select_device(config.device))
    heldout = data.heldout_examples(corpus, config)
    if not heldout:
        raise ValueError("the held-out set is empty: raise heldout-fraction")
    baselines = baseline_scores(heldout, data.abstracts(corpus), config.lead_words)
    return ServerState(config, tokenizer, spec, model, heldout, baselines)


def build_strategy(config: RunConfig) -> FeedbackFedAvg:
    return FeedbackFedAvg(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=config.min_available_nodes,
        reward_weighting=config.reward_weighting,
        sampling_seed=config.seed,
    )


def round_config(state: ServerState, phase: str) -> ConfigRecord:
    record = ConfigRecord({"phase": phase, "tokenizer-sha256": state.tokenizer_spec.sha256})
    if state.tokenizer_spec.payload:
        record["tokenizer-json"] = state.tokenizer_spec.payload
    return record


def run_federation(grid: Grid, context: Context) -> Path:
    """Run ``num-server-rounds`` rounds and write the results directory; return it."""
    config = RunConfig.from_mapping(context.run_config)
    state = prepare(config)
    run_dir = new_run_dir(config.results_path, config.run_name)
    log(INFO, "FLHF results directory: %s", run_dir)
    tracker = Tracker(run_dir, config.to_mapping())
    strategy = build_strategy(config)
    timeout = config.round_timeout or None
    try:
        initial = server_evaluate(state)
        tracker.log(0, "init", "server", None, {**initial, **state.baselines})
        log(
            INFO,
            "round 0: held-out rougeL %.2f (lead-%d baseline %.2f)",
            initial["rougeL"],
            config.lead_words,
            state.baselines[f"baseline-lead{config.lead_words}-rougeL"],
        )
        arrays = parameters_to_record(state.model)
        for server_round in range(1, config.num_server_rounds + 1):
            started = time.perf_counter()
            phase = "sft"
            messages = list(strategy.configure_train(server_round, arrays, round_config(state, phase), grid))
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            train_report = strategy.reports[(server_round, MessageType.TRAIN)]
            traffic = {
                "bytes-down": record_nbytes(arrays) * len(messages),
                "bytes-up": sum(
                    record_nbytes(r.content["arrays"])
                    for r in replies
                    if not r.has_error() and "arrays" in r.content
                ),
            }
            if new_arrays is None:
                log(WARNING, "round %d: no valid training reply; the global model is unchanged", server_round)
            else:
                arrays = new_arrays
                record_to_parameters(state.model, arrays)

            messages = list(
                strategy.configure_evaluate(server_round, arrays, round_config(state, phase), grid)
            )
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            client_eval = strategy.aggregate_evaluate(server_round, replies)
            eval_report = strategy.reports[(server_round, MessageType.EVALUATE)]
            heldout = server_evaluate(state)
            seconds = time.perf_counter() - started

            record_users(tracker, server_round, phase, train_report, eval_report)
            server_row = {
                **heldout,
                **train_columns(train_metrics or {}),
                **{f"client-{k}": v for k, v in eval_columns(client_eval or {}).items()},
                "clients": len(train_report.user_metrics),
                "failures": train_report.failures,
                **traffic,
                "seconds": seconds,
            }
            tracker.log(server_round, phase, "server", None, server_row)
            save_checkpoint(run_dir, state, server_round)
            log(
                INFO,
                "round %d/%d [%s] held-out rougeL %.2f loss %.3f | clients %d, failures %d | %.1fs",
                server_round,
                config.num_server_rounds,
                phase,
                heldout["rougeL"],
                heldout["loss"],
                len(train_report.user_metrics),
                train_report.failures,
                seconds,
            )
        finish(run_dir, tracker, state, initial)
    finally:
        tracker.close()
    log(INFO, "FLHF run finished: %s", run_dir)
    return run_dir


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
        "model-dir": str(run_dir / "model"),
    }
    tracker.write_summary(summary)
    plot_metrics(rows, run_dir / "plots", PLOTTED)
