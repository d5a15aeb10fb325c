"""Batched decoding with the model's KV cache (``model.generate``), defined by the run alone.

``model.generate`` fills every setting the caller leaves unset from the checkpoint's own
``generation_config`` (a hub summarizer may bring ``min_length``, ``no_repeat_ngram_size``,
``length_penalty`` or forced tokens). Decoding here must mean the same for every model, and
sampling for the feedback algorithms must draw from exactly the distribution whose
log-probabilities they differentiate; so within :func:`run_defaults_only` the checkpoint
contributes nothing but its special token ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from flhf_core.config import RunConfig
from flhf_core.learning.batches import prompt_codes


@dataclass(frozen=True)
class DecodingConfig:
    """How summaries are decoded.

    ``no_repeat_ngram_size`` blocks repeated n-grams: a small model's greedy
    output otherwise loops ("the the the ..."). ``encoder_repetition_penalty`` > 1 favours
    the document's own words (:class:`CopyBias`): a bias towards copying for a model that
    has seen too few summaries to copy on its own.
    """

    max_new_tokens: int = 48
    num_beams: int = 1
    no_repeat_ngram_size: int = 3
    encoder_repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    prompt_code_start: bool = False  # the decoder starts from the prompt's code (decoder-start)

    @classmethod
    def from_run_config(cls, config: RunConfig) -> DecodingConfig:
        return cls(
            max_new_tokens=config.max_new_tokens,
            num_beams=config.num_beams,
            no_repeat_ngram_size=config.no_repeat_ngram_size,
            encoder_repetition_penalty=config.encoder_repetition_penalty,
            prompt_code_start=config.prompt_code_start,
        )


class CopyBias(LogitsProcessor):
    """Raise the logits of the tokens a row's source contains (``encoder-repetition-penalty``).

    The rule of Hugging Face's ``encoder_repetition_penalty`` (a logit z of a source token
    becomes z * p if z > 0, z / p if z < 0; other tokens are untouched), with two differences:
    special tokens (``</s>``, padding) are never favoured, and a padded position is not part of
    its source. Hugging Face's own processor does both, so there a summary would end earlier,
    and depend on how much padding its batch gave its source.
    """

    def __init__(
        self, penalty: float, source_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: list[int]
    ):
        self.penalty = penalty
        self.source_ids = source_ids.masked_fill(attention_mask == 0, special_ids[0])
        self.special_ids = special_ids
        self.in_source: torch.Tensor | None = None  # [rows, vocabulary] bool, built on first use

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.in_source is None:
            mask = torch.zeros(
                self.source_ids.shape[0], scores.shape[1], dtype=torch.bool, device=scores.device
            )
            mask.scatter_(1, self.source_ids, True)
            mask[:, self.special_ids] = False
            self.in_source = mask
        mask = self.in_source.repeat_interleave(scores.shape[0] // self.in_source.shape[0], dim=0)
        favoured = torch.where(scores > 0, scores * self.penalty, scores / self.penalty)
        return torch.where(mask, favoured, scores)


GENERATION_BATCH = 64  # sources decoded at once


def decoder_start(
    tokenizer: PreTrainedTokenizerBase, sources: Sequence[str], prompt_code_start: bool, device: torch.device
) -> dict[str, torch.Tensor]:
    """``model.generate``'s keyword for each row's first decoder token: with prompt-code start
    the row's control code (:func:`~flhf_core.learning.batches.prompt_codes`), else nothing (the
    model's own start token)."""
    if not prompt_code_start:
        return {}
    codes = torch.tensor(prompt_codes(tokenizer, sources), dtype=torch.long, device=device)
    return {"decoder_start_token_id": codes}


SPECIAL_TOKEN_SETTINGS = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id")


@contextmanager
def run_defaults_only(model: PreTrainedModel) -> Iterator[None]:
    """Within the block, the checkpoint's generation defaults are only its special token ids."""
    saved = model.generation_config
    tokens = {key: getattr(saved, key, None) for key in SPECIAL_TOKEN_SETTINGS}
    model.generation_config = GenerationConfig(**{k: v for k, v in tokens.items() if v is not None})
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def generate_summaries(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str],
    decoding: DecodingConfig,
    max_source_tokens: int,
    batch_size: int = GENERATION_BATCH,
) -> list[str]:
    """Summaries of ``sources``, in input order, decoded in batches of similar length.

    Sorting by source length before batching wastes less compute on padding; each output
    depends only on its own source (padding is masked), so the order changes no summary.
    """
    if not sources:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = [
        len(ids)
        for ids in tokenizer(list(sources), max_length=max_source_tokens, truncation=True)["input_ids"]
    ]
    order = sorted(range(len(sources)), key=lambda i: -lengths[i])
    outputs: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = tokenizer(
            [sources[i] for i in chunk],
            max_length=max_source_tokens,
            truncation=True,
            padding=True,
            return_tensors="pt",
        ).to(device)
        processors = LogitsProcessorList()
        if decoding.encoder_repetition_penalty != 1.0:
            special = [i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None]
            special += [i for i in tokenizer.all_special_ids if i not in special]
            processors.append(
                CopyBias(
                    decoding.encoder_repetition_penalty, batch["input_ids"], batch["attention_mask"], special
                )
            )
        with run_defaults_only(model):
            generated = model.generate(
                **batch,
                **decoder_start(tokenizer, [sources[i] for i in chunk], decoding.prompt_code_start, device),
                logits_processor=processors,
                max_new_tokens=decoding.max_new_tokens,
                num_beams=decoding.num_beams,
                no_repeat_ngram_size=decoding.no_repeat_ngram_size,
                do_sample=decoding.do_sample,
                temperature=decoding.temperature if decoding.do_sample else None,
                top_p=decoding.top_p if decoding.do_sample else None,
                top_k=0 if decoding.do_sample else None,
            )
        written = tokenizer.batch_decode(generated[:, 1:], skip_special_tokens=True)  # [:, 1:]: the start
        outputs.update(zip(chunk, written, strict=True))
    model.train(was_training)
    return [outputs[i].strip() for i in range(len(sources))]


def summarize(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sources: Sequence[str], config: RunConfig
) -> list[str]:
    """Summaries of ``sources`` decoded as the run ``config`` says (its decoding settings and
    source length)."""
    return generate_summaries(
        model, tokenizer, sources, DecodingConfig.from_run_config(config), config.max_source_tokens
    )
