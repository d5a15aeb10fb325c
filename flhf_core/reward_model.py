"""A learned reward model: what scores the summaries a user did not judge (issue 13).

A real user rates a handful of summaries per round, not the ~320 a feedback round samples.
The reward model r(x, y) learns from the judgements the user did give and scores the rest.

**Architecture: the summarizer's encoder, copied, with a scalar head.** The alternative, a
separate tiny encoder trained from nothing, would have to learn the language of the corpus
from a few dozen judgements per user, which it cannot. The summarizer's encoder has been
trained on the corpus in the supervised rounds, so it already represents papers and
summaries in their vocabulary; the judgements then only have to fit a head and nudge the
encoder. It is a *copy*, never shared weights: the policy update must not move the reward
model (that would let the policy edit its own judge), and the reward model can be kept,
and later averaged or clustered, on its own, apart from the policy.

    input   "summary: <y> document: <x>"   (the summary first, so truncation never cuts it)
    h       = mean over tokens of the encoder's last hidden states
    r(x, y) = w · h + b                    (a score; sigmoid(r) predicts the rating in [0, 1])

Losses, on the judgements a user gave (both kinds may be present):

    pairs   (y_w preferred to y_l):  L_BT   = - mean log sigmoid(r(x, y_w) - r(x, y_l))
    ratings (y rated s in [0, 1]):   L_rate =   mean (sigmoid(r(x, y)) - s)^2

where the pairs are the user's choices *and* the pairs its ratings of one document order
(higher rating preferred): what the feedback algorithms use of a learned reward is its
ranking of one document's samples (a leave-one-out advantage, a best of n, a DPO pair), and a
squared error alone can be met by predicting every sample's mean rating.

(Bradley-Terry reward modelling as in Ouyang et al., 2022, https://arxiv.org/abs/2203.02155;
the regression keeps the scale of the ratings, which a pairwise loss alone leaves free.)

Over-optimization diagnostics (Gao et al., 2023, https://arxiv.org/abs/2210.10760), computed
against the simulated user's true utility, which nothing here trains on:

* ``accuracy``: over pairs of samples of the same document whose true utilities differ, the
  share the reward model orders as the user's utility does;
* ``correlation``: Pearson correlation of sigmoid(r) with the true utility;
* ``gap``: mean sigmoid(r) minus mean true utility of the policy's samples (the learned reward
  the policy believes it gets, minus what the user actually gets).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .model import canonical_parameters, parameters_to_record, record_to_parameters


class RewardModel(nn.Module):
    """An encoder and a scalar head: r(x, y) for a document x and a summary y."""

    def __init__(self, encoder: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)  # every summary scores 0 (rating 0.5) until judged
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_summarizer(cls, summarizer: PreTrainedModel) -> RewardModel:
        """A reward model whose encoder is a copy of ``summarizer``'s."""
        encoder = copy.deepcopy(summarizer.get_encoder())
        return cls(encoder, summarizer.config.d_model).to(next(summarizer.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(pooled).squeeze(-1)


HEAD_PREFIX = "head."  # the scalar head's parameters (``reward-model-personal-head`` keeps them home)


def shared_names(
    model: RewardModel, personal_head: bool, personal: frozenset[str] = frozenset()
) -> frozenset[str]:
    """The reward model's parameters that travel under a shared mode: all but those named in
    ``personal`` (the summarizer's personal parameters, e.g. a LoRA adapter in the encoder the
    reward model copied: they never leave the client, in either model) and, with
    ``personal_head``, the head (each user then scores through its own)."""
    names = frozenset(canonical_parameters(model)) - personal
    return frozenset(n for n in names if not n.startswith(HEAD_PREFIX)) if personal_head else names


def reward_input(document: str, summary: str) -> str:
    return f"summary: {summary} document: {document}"


def scores(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    summaries: Sequence[str],
    max_tokens: int,
) -> torch.Tensor:
    """r(x, y) of each (document, summary), as a 1-d tensor (with gradients if enabled)."""
    encoded = tokenizer(
        [reward_input(x, y) for x, y in zip(documents, summaries, strict=True)],
        max_length=max_tokens,
        truncation=True,
        padding=True,
        return_tensors="pt",
    ).to(next(model.parameters()).device)
    return model(encoded["input_ids"], encoded["attention_mask"])


# --------------------------------------------------------------------------
# Losses (pure functions of scores)
# --------------------------------------------------------------------------
def bradley_terry_loss(winner_scores: torch.Tensor, loser_scores: torch.Tensor) -> torch.Tensor:
    """- mean log sigmoid(r_w - r_l): the negative log-likelihood of the user's choices."""
    return -nn.functional.logsigmoid(winner_scores - loser_scores).mean()


def rating_loss(scores: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
    """mean (sigmoid(r) - s)^2: the ratings' squared error, on the ratings' own [0, 1] scale."""
    return ((torch.sigmoid(scores) - ratings) ** 2).mean()


# --------------------------------------------------------------------------
# What the user said, and fitting to it
# --------------------------------------------------------------------------
@dataclass
class Judgements:
    """The judgements a user gave: ratings of (document, summary) and choices between two
    summaries of one document. Both count against the budget alike."""

    rated: list[tuple[str, str, float]]  # (document, summary, rating)
    chosen: list[tuple[str, str, str]]  # (document, preferred summary, rejected summary)

    def __len__(self) -> int:
        return len(self.rated) + len(self.chosen)

    def pairs(self) -> list[tuple[str, str, str]]:
        """(document, preferred, rejected): the user's choices, and the pairs its ratings of one
        document order (the higher rating wins; equal ratings give none)."""
        by_document: dict[str, list[tuple[str, float]]] = {}
        for document, summary, rating in self.rated:
            by_document.setdefault(document, []).append((summary, rating))
        induced = [
            (document, a, b) if ra > rb else (document, b, a)
            for document, rated in by_document.items()
            for i, (a, ra) in enumerate(rated)
            for b, rb in rated[i + 1 :]
            if ra != rb
        ]
        return [*self.chosen, *induced]


def fit(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    judgements: Judgements,
    steps: int,
    optimizer: torch.optim.Optimizer,
    max_tokens: int,
    batch_size: int = 16,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """``steps`` optimizer steps on minibatches of the user's judgements (ratings and pairs
    alike); returns the losses of the last step (0 where a kind is absent). The caller keeps
    ``optimizer`` across calls of a round, so its moment estimates are not reset each time."""
    if not len(judgements):
        return {"rating-loss": 0.0, "pair-loss": 0.0}
    rng = rng or np.random.default_rng(0)
    model.train()
    pairs = judgements.pairs()
    items = [("rated", i) for i in range(len(judgements.rated))]
    items += [("pair", i) for i in range(len(pairs))]
    losses = {"rating-loss": 0.0, "pair-loss": 0.0}
    for _ in range(steps):
        batch = [items[i] for i in rng.choice(len(items), size=min(batch_size, len(items)), replace=False)]
        rated = [judgements.rated[i] for kind, i in batch if kind == "rated"]
        chosen = [pairs[i] for kind, i in batch if kind == "pair"]
        loss = torch.zeros((), device=next(model.parameters()).device)
        if rated:
            predicted = scores(
                model, tokenizer, [d for d, _, _ in rated], [s for _, s, _ in rated], max_tokens
            )
            target = torch.tensor([r for _, _, r in rated], device=predicted.device)
            rating = rating_loss(predicted, target)
            loss = loss + rating * len(rated) / len(batch)
            losses["rating-loss"] = rating.item()
        if chosen:
            documents = [d for d, _, _ in chosen]
            winners = scores(model, tokenizer, documents, [w for _, w, _ in chosen], max_tokens)
            losers = scores(model, tokenizer, documents, [lo for _, _, lo in chosen], max_tokens)
            pair = bradley_terry_loss(winners, losers)
            loss = loss + pair * len(chosen) / len(batch)
            losses["pair-loss"] = pair.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return losses


@torch.no_grad()
def judgement_loss(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    judgements: Judgements,
    max_tokens: int,
    batch_size: int = 16,
) -> float:
    """How badly ``model`` fits the user's judgements: the loss :func:`fit` minimizes, over all
    of them (each rating and each pair, chosen or ordered by ratings, weighing alike). What a
    clustered user reports of every cluster's model, so the server can put it where it fits
    (lower is better; 0 with no judgements)."""
    if not len(judgements):
        return 0.0
    model.eval()
    pairs = judgements.pairs()
    total = 0.0
    for start in range(0, len(judgements.rated), batch_size):
        rated = judgements.rated[start : start + batch_size]
        predicted = scores(model, tokenizer, [d for d, _, _ in rated], [s for _, s, _ in rated], max_tokens)
        target = torch.tensor([r for _, _, r in rated], device=predicted.device)
        total += rating_loss(predicted, target).item() * len(rated)
    for start in range(0, len(pairs), batch_size):
        chosen = pairs[start : start + batch_size]
        documents = [d for d, _, _ in chosen]
        winners = scores(model, tokenizer, documents, [w for _, w, _ in chosen], max_tokens)
        losers = scores(model, tokenizer, documents, [lo for _, _, lo in chosen], max_tokens)
        total += bradley_terry_loss(winners, losers).item() * len(chosen)
    return total / (len(judgements.rated) + len(pairs))


# --------------------------------------------------------------------------
# Over-optimization diagnostics (pure functions, against the true utility)
# --------------------------------------------------------------------------
def pairwise_accuracy(
    predicted: Sequence[float], utility: Sequence[float], groups: Sequence[object]
) -> float:
    """Share of same-group pairs with different true utility that ``predicted`` orders alike,
    a tie counting one half (chance is 0.5; NaN when there is no such pair)."""
    agree, total = 0.0, 0
    for i in range(len(utility)):
        for j in range(i + 1, len(utility)):
            if groups[i] != groups[j] or utility[i] == utility[j]:
                continue
            total += 1
            product = (predicted[i] - predicted[j]) * (utility[i] - utility[j])
            agree += 1.0 if product > 0 else 0.5 if product == 0 else 0.0  # a tie is a coin flip
    return agree / total if total else float("nan")


def correlation(predicted: Sequence[float], utility: Sequence[float]) -> float:
    """Pearson correlation (NaN when either side is constant)."""
    a, b = np.asarray(predicted, dtype=float), np.asarray(utility, dtype=float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def diagnostics(
    predicted: Sequence[float], utility: Sequence[float], groups: Sequence[object]
) -> dict[str, float]:
    """``reward-model-accuracy``, ``-correlation`` and ``-gap`` (``-score`` minus ``-utility``,
    their means) of predicted ratings (sigmoid(r)) against the true utilities of the same samples."""
    return {
        "reward-model-accuracy": pairwise_accuracy(predicted, utility, groups),
        "reward-model-correlation": correlation(predicted, utility),
        "reward-model-gap": float(np.mean(predicted) - np.mean(utility)),
        # the gap's two sides: the reward the policy is trained on, and what the user gets
        "reward-model-score": float(np.mean(predicted)),
        "reward-model-utility": float(np.mean(utility)),
    }


# --------------------------------------------------------------------------
# The user's reward model and judgements across rounds (every reward-model mode)
# --------------------------------------------------------------------------
STATE_RECORD = "reward-model"  # ArrayRecord in Context.state
JUDGEMENTS_RECORD = "reward-judgements"  # ConfigRecord in Context.state (with the round)
STATE_FILE = "reward-model.safetensors"  # parameters, with the judgements and round as metadata
VERSION_FILE = "reward-model.round-{round}.safetensors"  # older rounds a resume may go back to

log = logging.getLogger("flwr")


def judgements_to_mapping(judgements: Judgements) -> dict[str, list]:
    return {
        "rated-documents": [d for d, _, _ in judgements.rated],
        "rated-summaries": [s for _, s, _ in judgements.rated],
        "ratings": [float(r) for _, _, r in judgements.rated],
        "chosen-documents": [d for d, _, _ in judgements.chosen],
        "winners": [w for _, w, _ in judgements.chosen],
        "losers": [lo for _, _, lo in judgements.chosen],
    }


def judgements_from_mapping(mapping) -> Judgements:
    return Judgements(
        rated=list(
            zip(
                mapping["rated-documents"],
                mapping["rated-summaries"],
                map(float, mapping["ratings"]),
                strict=True,
            )
        ),
        chosen=list(zip(mapping["chosen-documents"], mapping["winners"], mapping["losers"], strict=True)),
    )


def _read(path: Path) -> tuple[int, dict[str, np.ndarray], Judgements]:
    """A saved file's round, parameters and judgements (raises if it cannot be read)."""
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
        arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return int(metadata["round"]), arrays, judgements_from_mapping(json.loads(metadata["judgements"]))


def saved_rounds(folder: Path) -> dict[int, Path]:
    """The user's saved reward models by the round that wrote them (the latest file and the
    older versions kept for a resume); an unreadable file is left out."""
    found = {}
    for path in folder.glob("reward-model*.safetensors"):
        try:
            with safe_open(str(path), framework="numpy") as handle:
                found[int((handle.metadata() or {})["round"])] = path
        except (OSError, ValueError, KeyError, SafetensorError):
            continue
    return found


def keep(
    context: Context,
    folder: Path,
    model: RewardModel,
    judgements: Judgements,
    server_round: int,
    window: int = 1,
) -> Path:
    """The user's reward model and judgements after ``server_round``: in Context.state, and in
    one file of ``folder`` (written atomically: parameters and judgements never disagree).
    As personal parameters do (:mod:`flhf_core.personal`), the user keeps the older versions a
    resume may replay from (``window``: the checkpoint interval) and drops those of rounds
    being replayed."""
    from .personal import versions_to_keep

    record = parameters_to_record(model)
    mapping = judgements_to_mapping(judgements)
    context.state[STATE_RECORD] = record
    context.state[JUDGEMENTS_RECORD] = ConfigRecord({**mapping, "round": server_round})
    folder.mkdir(parents=True, exist_ok=True)
    saved = saved_rounds(folder)
    for old_round, old_path in saved.items():  # the latest becomes a version; a replayed round's goes
        if old_round >= server_round:
            old_path.unlink()
        elif old_path.name == STATE_FILE:
            old_path.rename(folder / VERSION_FILE.format(round=old_round))
    saved = {r: folder / VERSION_FILE.format(round=r) for r in saved if r < server_round}
    for old_round in set(saved) - versions_to_keep(saved, server_round, window):
        saved[old_round].unlink(missing_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as handle:
        temporary = Path(handle.name)
    metadata = {"judgements": json.dumps(mapping), "round": str(server_round)}
    save_file({name: array.numpy() for name, array in record.items()}, str(temporary), metadata=metadata)
    os.replace(temporary, folder / STATE_FILE)
    return folder / STATE_FILE


def restore(
    context: Context, folder: Path, summarizer: PreTrainedModel, server_round: int
) -> tuple[RewardModel, Judgements]:
    """The user's reward model and judgements from before ``server_round``: from Context.state,
    else the newest of ``folder``'s files from an earlier round (a replayed round must not see
    what its killed first attempt left), else a new reward model (the received summarizer's
    encoder, an indifferent head) with no judgements. A file that cannot be used is reported
    and kept as ``*.corrupt`` (the first such copy is kept), and the user starts again: an
    older version is never silently taken in place of the latest (as with personal state)."""
    model = RewardModel.from_summarizer(summarizer)
    saved = context.state.config_records.get(JUDGEMENTS_RECORD)
    if (
        saved is not None
        and STATE_RECORD in context.state.array_records
        and int(saved["round"]) < server_round
    ):
        record_to_parameters(model, context.state.array_records[STATE_RECORD])
        return model, judgements_from_mapping(saved)
    rounds = saved_rounds(folder)
    latest = folder / STATE_FILE
    if latest.is_file() and latest not in rounds.values():
        _set_aside(latest, "cannot be read")
        return model, Judgements([], [])
    earlier = sorted((r, p) for r, p in rounds.items() if r < server_round)
    if earlier:
        path = earlier[-1][1]
        try:
            _, arrays, judgements = _read(path)
            # checked whole before anything is written: a misfit leaves the new model as it was
            record_to_parameters(model, ArrayRecord({k: Array(v) for k, v in arrays.items()}))
            return model, judgements
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            _set_aside(path, f"cannot be used ({error})")
    return model, Judgements([], [])


def _set_aside(path: Path, problem: str) -> None:
    evidence = path.with_name(path.name + ".corrupt")
    if not evidence.exists():
        shutil.copyfile(path, evidence)
    log.error("reward model %s %s: kept as %s, the user starts again", path, problem, evidence.name)
