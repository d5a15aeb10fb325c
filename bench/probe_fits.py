"""The reward models ``bench/reward_model_probe.py`` fits and compares: the product's fit, a
length-blind first model, heads on frozen encoder states, a one-parameter length rule, and the
splits and scores they are compared on."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
import torch

from flhf_core.learning import reward_model as rm

Scorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]  # (documents, summaries) -> scores
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def split_by_document(judgements: rm.Judgements, train_share: float) -> tuple[rm.Judgements, rm.Judgements]:
    """The judgements of the first ``train_share`` of the documents (those rated first, then those
    chosen between, each in the order given: the order judged, for one kind) and those of the rest."""
    order = list(dict.fromkeys([d for d, _, _ in judgements.rated] + [d for d, _, _ in judgements.chosen]))
    train_documents = set(order[: round(train_share * len(order))])

    def part(keep: bool) -> rm.Judgements:
        return rm.Judgements(
            [j for j in judgements.rated if (j[0] in train_documents) == keep],
            [j for j in judgements.chosen if (j[0] in train_documents) == keep],
        )

    return part(True), part(False)


def agreement_of(scorer: Scorer, pairs: Sequence[tuple[str, str, str]]) -> float:
    """Share of (document, preferred, rejected) that ``scorer`` orders as the user did (tie: 1/2)."""
    if not pairs:
        return float("nan")
    documents = [d for d, _, _ in pairs]
    margin = scorer(documents, [w for _, w, _ in pairs]) - scorer(documents, [lo for _, _, lo in pairs])
    return float(np.mean(np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))))


def summaries_of(judgements: rm.Judgements) -> list[tuple[str, str]]:
    """Every (document, summary) the judgements name, once."""
    named = [(d, s) for d, s, _ in judgements.rated]
    named += [(d, s) for d, w, lo in judgements.chosen for s in (w, lo)]
    return list(dict.fromkeys(named))


# --------------------------------------------------------------------------
# The reward models
# --------------------------------------------------------------------------
class LengthBlind(rm.RewardModel):
    """The reward model before its head saw length: the length buckets always read 0."""

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        return super().forward(input_ids, attention_mask, torch.zeros_like(lengths))


def fit_encoder_and_head(
    summarizer,
    tokenizer,
    train: rm.Judgements,
    steps: int,
    rates: tuple[float, float],
    max_tokens: int,
    blind: bool = False,
) -> Scorer:
    """The product's reward model (``blind``: the first one), fitted as a client fits it
    (minibatches of 16, AdamW)."""
    model = (LengthBlind if blind else rm.RewardModel).from_summarizer(summarizer)
    rm.fit(
        model, tokenizer, train, steps, rm.optimizer(model, *rates), max_tokens, rng=np.random.default_rng(0)
    )

    def scorer(documents: Sequence[str], summaries: Sequence[str]) -> np.ndarray:
        with torch.no_grad():
            return rm.scores(model, tokenizer, documents, summaries, max_tokens).numpy()

    return scorer


class Features:
    """The frozen encoder's pooled states, computed once per (document, summary)."""

    def __init__(self, summarizer, tokenizer, max_tokens: int) -> None:
        self.model = rm.RewardModel.from_summarizer(summarizer).eval()
        self.tokenizer, self.max_tokens, self.cache = tokenizer, max_tokens, {}

    def __call__(self, documents: Sequence[str], summaries: Sequence[str]) -> torch.Tensor:
        missing = [k for k in dict.fromkeys(zip(documents, summaries, strict=True)) if k not in self.cache]
        for start in range(0, len(missing), 32):
            batch = missing[start : start + 32]
            batch_documents, batch_summaries = zip(*batch, strict=True)
            encoded = rm.encoded_inputs(self.tokenizer, batch_documents, batch_summaries, self.max_tokens)
            with torch.no_grad():
                pooled = self.model.pooled(encoded["input_ids"], encoded["attention_mask"])
            self.cache.update(zip(batch, pooled, strict=True))
        return torch.stack([self.cache[k] for k in zip(documents, summaries, strict=True)])


def fit_head(
    features: Features, train: rm.Judgements, steps: int, rates: tuple[float, float], see_length: bool = True
) -> Scorer:
    """The product's head alone on the frozen encoder (``see_length=False``: on the pooled
    states alone, the head before it saw length), full batch, on the losses of
    :func:`flhf_core.learning.reward_model.fit`."""
    head = rm.ScoreHead(features.model.head.content.in_features)
    content_rate, length_rate = rates
    optimizer = torch.optim.AdamW(
        [
            {"params": head.content.parameters(), "lr": content_rate},
            {"params": head.length.parameters(), "lr": length_rate},
        ]
    )

    def forward(documents: Sequence[str], summaries: Sequence[str]) -> torch.Tensor:
        lengths = rm.length_features(summaries) * (1.0 if see_length else 0.0)
        return head(features(documents, summaries), lengths)

    pairs = train.pairs()
    ratings = torch.tensor([r for _, _, r in train.rated])
    for _ in range(steps):
        loss = torch.zeros(())
        if train.rated:
            rated = forward([d for d, _, _ in train.rated], [s for _, s, _ in train.rated])
            loss = loss + rm.rating_loss(rated, ratings)
        if pairs:
            documents = [d for d, _, _ in pairs]
            winners = forward(documents, [w for _, w, _ in pairs])
            loss = loss + rm.bradley_terry_loss(winners, forward(documents, [lo for _, _, lo in pairs]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def scorer(documents: Sequence[str], summaries: Sequence[str]) -> np.ndarray:
        with torch.no_grad():
            return forward(documents, summaries).numpy()

    return scorer


def fit_length(train: rm.Judgements) -> tuple[Scorer, int]:
    """The rule "closer to L words is better", with the L in 5..60 that best orders the training pairs."""

    def rule(length: int) -> Scorer:
        return lambda _, summaries: (
            -np.abs(np.array([len(_WORD.findall(s.lower())) for s in summaries]) - length)
        )

    best = max(range(5, 61), key=lambda length: agreement_of(rule(length), train.pairs()))
    return rule(best), best


def merged(parts: Sequence[rm.Judgements], held_out: rm.Judgements) -> rm.Judgements:
    """Several users' judgements in one, less any of a document ``held_out`` holds (users with
    other aspects may hold the same document: its judgements would leak the held-out side)."""
    kept = {d for d, _, _ in held_out.rated} | {d for d, _, _ in held_out.chosen}
    return rm.Judgements(
        [j for p in parts for j in p.rated if j[0] not in kept],
        [j for p in parts for j in p.chosen if j[0] not in kept],
    )


# --------------------------------------------------------------------------
