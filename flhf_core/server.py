"""The ServerApp's work: prepare the run, then run the federation and write its results.

:mod:`flhf_core.server_state` holds the server's data and global model and evaluates it;
:mod:`flhf_core.federation` runs the rounds.
"""

from __future__ import annotations

from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid
from flwr.supercore import log

from .config import RunConfig
from .federation import Federation, RoundFailed
from .server_state import build_strategy, prepare, round_learning_rate, shared_parameter_names
from .tracking import (
    Tracker,
    new_run_dir,
)

__all__ = ["RoundFailed", "round_learning_rate", "run_federation", "shared_parameter_names"]


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
