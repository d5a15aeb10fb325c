"""What one round leaves on record: who was asked, who counted and why not (:class:`RoundReport`),
and the columns every ``metrics.jsonl`` row starts with. The server fills them; the run's
files, checkpoints and trackers read them."""

from __future__ import annotations

from dataclasses import dataclass, field

METRIC_COLUMNS = ("round", "phase", "scope", "client")

# Why a reply did not count, as a fixed code (its reason says more, in words):
REJECTION_CODES = (
    "error",  # an error reply (the ClientApp raised, or Flower could not deliver)
    "timeout",  # no reply within the round timeout
    "decode",  # an array whose bytes do not decode as a NumPy array
    "size",  # an array's bytes larger than the global model's array can take
    "shape",  # names, shapes or records other than the global model's
    "dtype",  # an array of another dtype than the global model's
    "non-finite",  # an array with NaN or infinite values
    "metrics",  # a figure the weighting or the rows need missing, not a number, not finite, out of range
    "identity",  # a reply naming another user than its node's, or a user another node holds
    "duplicate",  # a second reply for a user in the same round
)


@dataclass(frozen=True)
class Rejection:
    node_id: int
    user_id: int | None
    reason: str
    code: str = "error"  # one of REJECTION_CODES (a checkpoint written before codes holds none)


def rejection_counts(rejected: list[Rejection]) -> dict[str, int]:
    """``rejected-<code>``: how many replies each code rejected (every code, zeros included)."""
    return {f"rejected-{code}": sum(r.code == code for r in rejected) for code in REJECTION_CODES}


@dataclass
class RoundReport:
    """What the strategy saw in one round: who was asked, who counted, why not."""

    server_round: int
    phase: str
    sampled_nodes: list[int] = field(default_factory=list)
    user_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    user_lists: dict[int, dict[str, list[float]]] = field(default_factory=dict)  # per-document figures
    weights: dict[int, float] = field(default_factory=dict)
    step: float = 1.0  # how far the average moves from the global model (below 1: q-FFL's step)
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def failures(self) -> int:
        """Sampled minus valid: error replies, rejected replies and missing ones."""
        return len(self.sampled_nodes) - len(self.user_metrics)
