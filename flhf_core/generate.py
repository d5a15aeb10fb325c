"""Batched decoding with the model's KV cache (``model.generate``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import RunConfig


@dataclass(frozen=True)
class DecodingConfig:
    """How summaries are decoded.

    ``no_repeat_ngram_size`` blocks repeated n-grams: a small model's greedy
    output otherwise loops ("the the the ...").
    """

    max_new_tokens: int = 48
    num_beams: int = 1
    no_repeat_ngram_size: int = 3
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    @classmethod
    def from_run_config(cls, config: RunConfig) -> DecodingConfig:
        return cls(config.max_new_tokens, config.num_beams, config.no_repeat_ngram_size)


@torch.no_grad()
def generate_summaries(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str],
    decoding: DecodingConfig,
    max_source_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Summaries of ``sources``, decoded in batches, in input order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(sources), batch_size):
        batch = tokenizer(
            list(sources[start : start + batch_size]),
            max_length=max_source_tokens,
            truncation=True,
            padding=True,
            return_tensors="pt",
        ).to(device)
        generated = model.generate(
            **batch,
            max_new_tokens=decoding.max_new_tokens,
            num_beams=decoding.num_beams,
            no_repeat_ngram_size=decoding.no_repeat_ngram_size or None,
            do_sample=decoding.do_sample,
            temperature=decoding.temperature if decoding.do_sample else None,
            top_p=decoding.top_p if decoding.do_sample else None,
        )
        outputs.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
    model.train(was_training)
    return [o.strip() for o in outputs]
