"""The ServerApp's work: prepare the run, then run the federation and write its results.

:mod:`flhf_core.server.state` holds the server's data and global model and evaluates it;
:mod:`flhf_core.server.federation` runs the rounds.
"""

from __future__ import annotations

from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid
from flwr.supercore import log

from flhf_core.config import RunConfig
from flhf_core.results.checkpoint import (
    check_resumable,
    check_tokenizer,
    load_checkpoint,
    load_model_into,
    restore_metrics,
)
from flhf_core.results.tracking import Tracker, new_run_dir
from flhf_core.server.federation import Federation, RoundFailed
from flhf_core.server.state import build_strategy, prepare, round_learning_rate, shared_parameter_names

__all__ = ["RoundFailed", "round_learning_rate", "run_federation", "shared_parameter_names"]


def run_federation(grid: Grid, context: Context) -> Path:
    """Run ``num-server-rounds`` rounds and write the results directory; return it.

    With ``resume = true`` the run in ``<results-dir>/<run-name>`` goes on from its last
    checkpoint (:mod:`flhf_core.results.checkpoint`), in the same folder.

    If a round fails (no valid training reply, or any exception), the rounds before it
    stay in metrics.jsonl, summary.json is written with ``status: failed`` and the
    reason, the last good global model is saved, and the error is raised again so that
    Flower marks the run failed.
    """
    config = RunConfig.from_mapping(context.run_config)
    checkpoint = None
    if config.resume:  # checked before anything is touched: a refused resume leaves the folder as it was
        checkpoint = load_checkpoint(config.run_path)
        check_resumable(checkpoint.config, config.to_mapping())
    trained = None
    if (
        checkpoint is not None
        and config.model == "tiny-t5"
        and (checkpoint.folder / "tokenizer.json").is_file()
    ):
        # the vocabulary its weights use, if the run trained one (the shipped one is used as shipped)
        trained = (checkpoint.folder / "tokenizer.json").read_bytes()
    state = prepare(config, trained)  # every bad input fails here, before anything is written
    if checkpoint is not None:
        check_tokenizer(checkpoint.tokenizer_sha256, state.tokenizer_spec.sha256)
    first_round = 0
    if checkpoint is None:
        run_dir = new_run_dir(config.results_path, config.run_name)
    else:
        load_model_into(state.model, checkpoint)
        run_dir = config.run_path
        first_round = restore_metrics(run_dir, checkpoint)
    log(INFO, "FLHF results directory: %s", run_dir)
    tracker = Tracker(run_dir, config.to_mapping(), config.trackers, first_round)
    federation = Federation(grid, state, tracker, build_strategy(config))
    try:
        federation.run(checkpoint)
    except BaseException as error:
        log(ERROR, "FLHF run failed: %s: %s", type(error).__name__, error)
        federation.finish(error)
        raise
    finally:
        tracker.close()
    log(INFO, "FLHF run finished: %s", run_dir)
    return run_dir
