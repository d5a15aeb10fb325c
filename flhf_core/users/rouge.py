"""ROUGE (``rouge-score``): how a simulated user compares a summary with its reference, and how
summaries are reported. No torch: the users and the learning code both import it.

ROUGE is F1; :func:`rouge` reports it in percent (0-100), as summarization papers do.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@functools.lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    # rouge-score logs through absl, which calls logging.basicConfig() when the root logger
    # has no handler; Flower's log lines would then all print twice.
    if not logging.root.handlers:
        logging.root.addHandler(logging.NullHandler())
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_pair(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 (0-1) of one prediction against one reference."""
    scores = _scorer().score(reference, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 in percent over aligned predictions and references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {name: 0.0 for name in ROUGE_TYPES}
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        for name, value in rouge_pair(prediction, reference).items():
            totals[name] += value
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}
