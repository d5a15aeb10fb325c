"""FLHF: federated learning with human feedback for personalized summaries.

The package is arranged by who runs the code (each folder's ``__init__`` says what it holds):
``server/`` (the ServerApp), ``client/`` (a user's device), ``learning/`` (torch code),
``users/`` (the simulated users), ``data/``, ``results/`` (what a run leaves) and ``runs/``
(the ``flhf`` command, launchers, deployments); ``config``, ``protocol`` and ``common`` are
shared by all.

``run_flhf_simulation``, ``RunResult``, ``FeedbackFedAvg`` and ``RunConfig`` are imported on
first use, so that ``import flhf_core.<module>`` stays light in the apps' processes.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "RunResult": "flhf_core.runs.api",
    "run_flhf_simulation": "flhf_core.runs.api",
    "FeedbackFedAvg": "flhf_core.server.strategy",
    "RunConfig": "flhf_core.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flhf_core' has no attribute {name!r}")
