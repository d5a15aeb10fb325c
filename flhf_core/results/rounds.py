"""What one round leaves on record: who was asked, who counted and why not (:class:`RoundReport`),
and the columns every ``metrics.jsonl`` row starts with. The server fills them; the run's
files, checkpoints and trackers read them."""

from __future__ import annotations

from dataclasses import dataclass, field

METRIC_COLUMNS = ("round", "phase", "scope", "client")


@dataclass(frozen=True)
class Rejection:
    node_id: int
    user_id: int | None
    reason: str


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
