"""FLHF: federated learning with human feedback for personalized summaries.

``run_flhf_simulation`` and ``RunResult`` (see :mod:`flhf_core.api`) are imported on first
use, so that ``import flhf_core.<module>`` stays light in the apps' processes.
"""

from typing import Any

__all__ = ["RunResult", "run_flhf_simulation"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'flhf_core' has no attribute {name!r}")
