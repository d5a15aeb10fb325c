"""Quality figures: ROUGE (``rouge-score``), loss and perplexity, extractive baselines.

ROUGE is reported as F1 in percent (0-100), as summarization papers do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flhf_core.config import RunConfig
from flhf_core.data.corpus import Document, Example, sentences_of
from flhf_core.learning.batches import Batch, make_batches
from flhf_core.learning.generate import summarize
from flhf_core.users.rouge import rouge


@torch.no_grad()
def token_loss(
    model: PreTrainedModel, batches: Sequence[Batch], reference: PreTrainedModel | None = None
) -> tuple[float, float, float | None]:
    """Mean cross-entropy per target token, its perplexity exp(loss), and with a ``reference``
    model the mean per-token KL(model || reference), from the same forward pass of ``model``."""
    was_training = model.training
    model.eval()
    if reference is not None:
        reference.eval()
    device = next(model.parameters()).device
    total_nll, total_kl, total_tokens = 0.0, 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        inputs = batch.model_inputs()
        logits = model(**inputs).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="sum"
        )
        total_nll += nll.item()
        mask = batch.labels != -100
        total_tokens += int(mask.sum())
        if reference is not None:
            logp = torch.log_softmax(logits[mask], dim=-1)
            logq = torch.log_softmax(reference(**inputs).logits.float()[mask], dim=-1)
            total_kl += (logp.exp() * (logp - logq)).sum().item()
    model.train(was_training)
    loss = total_nll / max(total_tokens, 1)
    kl = total_kl / max(total_tokens, 1) if reference is not None else None
    return loss, math.exp(min(loss, 50.0)), kl


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    config: RunConfig,
    predictions: Sequence[str] | None = None,
    reference: PreTrainedModel | None = None,
    batches: Sequence[Batch] | None = None,
) -> dict[str, float]:
    """Loss, perplexity, ROUGE and mean output length of ``model`` on ``examples``.

    ``predictions``: the model's greedy summaries of ``examples`` if the caller decoded them
    already (in one pass with other documents); else they are decoded here. ``reference``:
    also ``kl-to-reference``, the mean per-token KL(model || reference) on the references.
    ``batches``: the examples' batches, if the caller keeps them.
    """
    if batches is None:
        batches = make_batches(
            tokenizer,
            examples,
            32,
            config.max_source_tokens,
            config.max_target_tokens,
            prompt_code_start=config.prompt_code_start,
        )
    loss, perplexity, kl = token_loss(model, batches, reference)
    if predictions is None:
        predictions = summarize(model, tokenizer, [e.source for e in examples], config)
    scores = rouge(predictions, [e.summary for e in examples])
    words = sum(len(p.split()) for p in predictions) / max(len(predictions), 1)
    metrics = {"loss": loss, "perplexity": perplexity, **scores, "output-words": words}
    if len({e.aspect for e in examples}) > 1:  # the server's held-out set: every aspect
        metrics.update(by_aspect(examples, predictions))
    if kl is not None:
        metrics["kl-to-reference"] = kl
    return metrics


# --------------------------------------------------------------------------
# Extractive baselines: where a model stands against trivial summaries
# --------------------------------------------------------------------------
def lead_words(document: str, k: int) -> str:
    """The first ``k`` words of the document."""
    return " ".join(document.split()[:k])


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (the abstract's usually states the challenge)."""
    sentences = sentences_of(text)
    return sentences[0] if sentences else ""


def last_sentence(text: str) -> str:
    """The last sentence of ``text`` (the abstract's usually states the outcome)."""
    sentences = sentences_of(text)
    return sentences[-1] if sentences else ""


def by_aspect(examples: Sequence[Example], predictions: Sequence[str]) -> dict[str, float]:
    """ROUGE-L of ``predictions`` on each aspect's examples alone: ``rougeL-<aspect>``."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for example, prediction in zip(examples, predictions, strict=True):
        mine, theirs = groups.setdefault(example.aspect, ([], []))
        mine.append(prediction)
        theirs.append(example.summary)
    return {f"rougeL-{aspect}": rouge(p, r)["rougeL"] for aspect, (p, r) in sorted(groups.items())}


def baseline_scores(
    examples: Sequence[Example], documents: Mapping[str, Document], k: int
) -> dict[str, float]:
    """ROUGE of the extractive baselines on ``examples``, overall and per aspect.

    The first ``k`` words of the whole document (``lead<k>``; not of what an extractor left the
    model to read), and the first and the last sentence of the abstract; ``baseline-best-per-aspect-rougeL`` takes, for each aspect, the best of
    them (chosen on these very examples: an upper bound for any one of these rules),
    averaged over examples.
    """
    references = [e.summary for e in examples]
    candidates = {
        f"lead{k}": [lead_words(documents[e.doc_id].text, k) for e in examples],
        "first-sentence": [first_sentence(documents[e.doc_id].abstract) for e in examples],
        "last-sentence": [last_sentence(documents[e.doc_id].abstract) for e in examples],
    }
    scores: dict[str, float] = {}
    per_aspect: dict[str, dict[str, float]] = {}
    for name, predictions in candidates.items():
        overall = rouge(predictions, references)
        scores[f"baseline-{name}-rougeL"] = overall["rougeL"]
        scores[f"baseline-{name}-rouge1"] = overall["rouge1"]
        for key, value in by_aspect(examples, predictions).items():
            aspect = key.removeprefix("rougeL-")
            scores[f"baseline-{name}-rougeL-{aspect}"] = value
            per_aspect.setdefault(aspect, {})[name] = value
    counts = {a: sum(e.aspect == a for e in examples) for a in per_aspect}
    scores["baseline-best-per-aspect-rougeL"] = sum(
        max(per_aspect[a].values()) * counts[a] for a in per_aspect
    ) / max(sum(counts.values()), 1)
    return scores
