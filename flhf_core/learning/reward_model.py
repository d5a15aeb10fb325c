"""A learned reward model: what scores the summaries a user did not judge (issue 13).

A real user rates a handful of summaries per round, not the ~320 a feedback round samples.
The reward model r(x, y) learns from the judgements the user did give and scores the rest.

**Architecture: the summarizer's encoder, copied, with a scalar head that also sees the
summary's length.** The alternative, a separate tiny encoder trained from nothing, would have
to learn the language of the corpus from a few dozen judgements per user, which it cannot.
The summarizer's encoder has been trained on the corpus in the supervised rounds, so it
already represents papers and summaries in their vocabulary; the judgements then only have to
fit a head and nudge the encoder. It is a *copy*, never shared weights: the policy update must
not move the reward model (that would let the policy edit its own judge), and the reward
model can be kept, and later averaged or clustered, on its own, apart from the policy.

The head sees the length because mean pooling hides it (a mean over tokens barely moves when a
summary grows by a clause), and length is most of what separates one document's samples for a
user. ``bench/reward_model_probe.py`` refits reward models on a finished run's judgements and
tests them on held-out documents. On a 32-judgement run's, the model before this head (pooled
states only, encoder at 1e-3) ordered the user's held-out pairs as the user did 0.49 of the
time, chance, and a one-parameter "closer to L words" rule 0.69 (0.74 by the true utility). On
a later run's (``bench/results/reward-model-probe.json``) this model gets 0.73 (0.78), the
model before it 0.60 (0.64; 0.95 on what it learned), the rule 0.71 (0.77), the pooled states
alone 0.59 (0.56). Length is also the best-known axis of human preference in RLHF (Singhal et
al., 2023, https://arxiv.org/abs/2310.03716). Soft length buckets let the head learn any
length profile (a preferred length, or "shorter is better"); as a linear model on a dozen
features it can learn it from few judgements, so it has its own, larger learning rate
(``reward-model-length-learning-rate``: a few dozen steps at the encoder's rate move it too
little to matter). The encoder and the content weights, hundreds of thousands of parameters
fitted to a few dozen noisy judgements, memorize them (at 1e-3: pair agreement 0.95 on what
they learned, near chance on held-out documents), so they are only nudged
(``reward-model-learning-rate`` 1e-4).

    input   "summary: <y> document: <x>"   (the summary first, so truncation never cuts it)
    h       = mean over tokens of the encoder's last hidden states
    l_k     = exp(-((words(y) - c_k) / w)^2 / 2)   for length buckets c_k = 5, 10, ..., 50 words
    r(x, y) = u · h + v · l + b              (a score; sigmoid(r) predicts the rating in [0, 1])

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
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from flhf_core.learning import conditioning, warm_start
from flhf_core.learning.model import canonical_parameters

# The layout of the reward model's parameters, in the server's checkpoint (a resume of another
# layout is refused: checkpoint.check_reward_model_format) and, for the record, with every
# user's saved reward model (1: a head on the pooled states alone; 2: the head's content and
# length parts, issue 13's second pass).
FORMAT = 2

# Length buckets of the head (words): the summaries here run ~10-45 words (max-new-tokens 48).
LENGTH_CENTERS = tuple(range(5, 55, 5))
LENGTH_WIDTH = 5.0  # words: neighbouring buckets overlap, so every length is between two


def length_features(summaries: Sequence[str]) -> torch.Tensor:
    """Each summary's soft length buckets, ``(len(summaries), len(LENGTH_CENTERS))``."""
    # clamped to the buckets' range: a summary longer than the last bucket scores as one at the
    # last, so it cannot escape a learned "too long" by growing further (none would be near it)
    words = torch.tensor([float(len(s.split())) for s in summaries]).clamp(
        LENGTH_CENTERS[0], LENGTH_CENTERS[-1]
    )
    centers = torch.tensor(LENGTH_CENTERS, dtype=torch.float32)
    return torch.exp(-0.5 * ((words[:, None] - centers) / LENGTH_WIDTH) ** 2)


class ScoreHead(nn.Module):
    """r = u · h + v · l + b: a linear score of the pooled states h (``content``) and of the
    length buckets l (``length``, which holds the offset b)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        # built without nn.Linear's random initialization, which would draw from torch's
        # generator, the one the policy samples from on CPU: a run with a reward model must
        # sample what the same run without one samples (LearnedScorer, "its own random streams")
        self.content = nn.utils.skip_init(nn.Linear, hidden_size, 1, bias=False)
        self.length = nn.utils.skip_init(nn.Linear, len(LENGTH_CENTERS), 1)
        for parameter in self.parameters():  # every summary scores 0 (rating 0.5) until judged
            nn.init.zeros_(parameter)

    def forward(self, pooled: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return (self.content(pooled) + self.length(lengths)).squeeze(-1)


class RewardModel(nn.Module):
    """An encoder and a scalar head: r(x, y) for a document x and a summary y."""

    def __init__(self, encoder: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = ScoreHead(hidden_size)

    @classmethod
    def from_summarizer(cls, summarizer: PreTrainedModel) -> RewardModel:
        """A reward model whose encoder is a copy of ``summarizer``'s."""
        encoder = conditioning.strip_conditioning(copy.deepcopy(summarizer.get_encoder()))
        hidden = summarizer.get_encoder().config.hidden_size
        return cls(encoder, hidden).to(next(summarizer.parameters()).device)

    @classmethod
    def from_sentence_encoder(cls, device: torch.device | str = "cpu") -> RewardModel:
        """A reward model on the pretrained sentence encoder (all-MiniLM-L6-v2, ``reward-model-encoder
        = minilm``): trained on a billion sentence pairs to place texts that say the same close
        together, where the summarizer's encoder has read only this corpus."""
        encoder = copy.deepcopy(_sentence_encoder())  # 22M parameters: read from disk once per process
        return cls(encoder, encoder.config.hidden_size).to(device)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """h: the mean over tokens of the encoder's last hidden states."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        return self.head(self.pooled(input_ids, attention_mask), lengths.to(input_ids.device))


@functools.cache
def _sentence_encoder() -> nn.Module:
    from transformers import BertModel

    with torch.random.fork_rng(devices=[]):  # loading draws nothing from the policy's stream
        return BertModel.from_pretrained(warm_start.checkpoint_folder(), add_pooling_layer=False)


ENCODERS = ("summarizer", "minilm")  # reward-model-encoder's values


def new_reward_model(encoder: str, summarizer: PreTrainedModel) -> RewardModel:
    """A reward model before any judgement: on a copy of the summarizer's encoder, or on the
    pretrained sentence encoder (``encoder``: ``reward-model-encoder``)."""
    if encoder == "minilm":
        return RewardModel.from_sentence_encoder(next(summarizer.parameters()).device)
    return RewardModel.from_summarizer(summarizer)


def reward_tokenizer(encoder: str, summarizer_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer of the reward model's encoder: the summarizer's, or the sentence encoder's."""
    return warm_start.load_tokenizer() if encoder == "minilm" else summarizer_tokenizer


HEAD_PREFIX = "head."  # the scalar head's parameters (``reward-model-personal-head`` keeps them home)


def optimizer(model: RewardModel, learning_rate: float, length_learning_rate: float) -> torch.optim.Optimizer:
    """AdamW: the encoder and the head's content weights (many parameters, few judgements: nudged)
    at ``learning_rate``, the head's length profile and offset (a dozen) at ``length_learning_rate``."""
    fast = list(model.head.length.parameters())
    slow = [p for p in model.parameters() if all(p is not q for q in fast)]
    return torch.optim.AdamW(
        [{"params": slow, "lr": learning_rate}, {"params": fast, "lr": length_learning_rate}]
    )


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


def encoded_inputs(
    tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], summaries: Sequence[str], max_tokens: int
) -> BatchEncoding:
    """The reward model's input ids and attention mask of each (document, summary), padded."""
    return tokenizer(
        [reward_input(x, y) for x, y in zip(documents, summaries, strict=True)],
        max_length=max_tokens,
        truncation=True,
        padding=True,
        return_tensors="pt",
    )


def scores(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    summaries: Sequence[str],
    max_tokens: int,
) -> torch.Tensor:
    """r(x, y) of each (document, summary), as a 1-d tensor (with gradients if enabled)."""
    encoded = encoded_inputs(tokenizer, documents, summaries, max_tokens).to(next(model.parameters()).device)
    return model(encoded["input_ids"], encoded["attention_mask"], length_features(summaries))


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
    # how the reward model, before it learned them, ordered the pairs of each new judgement:
    # 1 agreed, 0.5 tie, 0 disagreed, oldest first (what :func:`trusted` reads)
    checks: list[float] = field(default_factory=list)
    # ``clustered``: the cluster whose model made the checks (None: the user's own model). A
    # model of another cluster is another model: its record starts empty.
    checked_cluster: int | None = None

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


@torch.no_grad()
def agreement(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str, str]],
    max_tokens: int,
) -> list[float]:
    """For each (document, preferred, rejected): 1 if ``model`` scores the preferred summary
    higher, 0.5 on a tie, else 0. Taken on judgements the model has not learned from, this is
    its held-out ranking accuracy on what the user really said (the user's own noise included)."""
    if not pairs:
        return []
    model.eval()
    documents = [d for d, _, _ in pairs]
    winners = scores(model, tokenizer, documents, [w for _, w, _ in pairs], max_tokens)
    losers = scores(model, tokenizer, documents, [lo for _, _, lo in pairs], max_tokens)
    margin = (winners - losers).tolist()
    return [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margin]


# Over how many of the latest checked pairs the gate judges a reward model: recent enough to
# follow a model that improves each step, enough pairs that the bound below can clear chance.
TRUST_WINDOW = 32
TRUST_MINIMUM = 16  # fewer checked pairs than this are no evidence either way
# One-sided 95% confidence (z = 1.645). The gate is asked again every step, so a loose bound
# would let a useless model through on one lucky window: with the bound at 0.55 over 32
# independent pairs, a model at chance would score in ~1% of steps, one at 55% true accuracy
# in ~4%, one at 70% in ~50%. The pairs are not independent (a document's 4 ratings order 6
# pairs, so 32 pairs are ~5 documents): simulated that way, a model at chance passes in ~3-5%.
TRUST_CONFIDENCE_Z = 1.645


def agreement_lower_bound(checks: Sequence[float], z: float = TRUST_CONFIDENCE_Z) -> float:
    """The Wilson score lower bound of the agreement rate behind ``checks`` (each 1, 0.5 for a
    tie, or 0): the agreement the model reaches with confidence given by ``z``. Wilson rather
    than the normal bound, which is too optimistic at rates near 1 and few checks
    (E. B. Wilson, 1927; Brown, Cai and DasGupta, Statistical Science 2001)."""
    n = len(checks)
    if n == 0:
        return 0.0
    rate = float(np.mean(checks))
    spread = z * np.sqrt(rate * (1.0 - rate) / n + z * z / (4.0 * n * n))
    return float((rate + z * z / (2.0 * n) - spread) / (1.0 + z * z / n))


def trusted(checks: Sequence[float], threshold: float) -> bool:
    """Whether a reward model may score for the user: the lower confidence bound of its
    agreement with the user's latest ``TRUST_WINDOW`` judged pairs, each taken before the model
    learned it, is at least ``threshold`` (``reward-model-trust``; 0 trusts it always), over at
    least ``TRUST_MINIMUM`` pairs. A model no better than chance must not steer the policy: the
    policy follows its confident but arbitrary rankings (``bench/overoptimization.py``
    measured that), and one at 55% true accuracy still cost PPO its gain (BENCHMARKS)."""
    if threshold == 0.0:
        return True
    recent = checks[-TRUST_WINDOW:]
    return len(recent) >= TRUST_MINIMUM and agreement_lower_bound(recent) >= threshold


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
