"""Tokenized examples and padded batches.

Examples are tokenized once (:func:`encode`) and collated into padded batches as often as
needed (:func:`collate`): a user trains on the same examples for several epochs and rounds,
and in simulation one worker process serves the same user many times, so the token ids are
cached by the caller (:mod:`flhf_core.client.session`) rather than recomputed per batch. Collating
pads on the right with the tokenizer's pad id, exactly as ``tokenizer(..., padding=True)``.

With ``decoder-start = "prompt-code"`` the decoder's first input is the prompt's control code
(the first word piece of the source: ``challenge`` in ``challenge: <document>``) instead of the
model's fixed start token (:func:`prompt_codes`). Through the encoder alone a small model
trained from scratch learns to ignore the code and writes one template for every aspect; as the
decoder's first token the code is in every step's self-attention. A batch then carries its
``decoder_input_ids`` (the code, then the target shifted right) and generation starts each row
from its code (:mod:`flhf_core.learning.generate`, :mod:`flhf_core.learning.algorithms.rollout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flhf_core.config import ConfigError
from flhf_core.data.corpus import Example


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # target ids with padding set to -100 (ignored by the loss)
    decoder_input_ids: torch.Tensor | None = None  # prompt-code start: the code, then the target shifted

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            None if self.decoder_input_ids is None else self.decoder_input_ids.to(device),
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward pass (with ``labels``: it returns the loss)."""
        inputs = dict(input_ids=self.input_ids, attention_mask=self.attention_mask, labels=self.labels)
        if self.decoder_input_ids is not None:
            inputs["decoder_input_ids"] = self.decoder_input_ids
        return inputs


def prompt_codes(tokenizer, sources: Sequence[str]) -> list[int]:
    """The first word piece of each source that writes something (special tokens and a bare
    word-boundary piece such as SentencePiece's ``▁`` aside): its control code."""
    rows = tokenizer(list(sources), add_special_tokens=False)["input_ids"]
    fallback = int(tokenizer.pad_token_id)
    return [next((int(i) for i in row[:4] if tokenizer.decode([i]).strip()), fallback) for row in rows]


def check_distinct_codes(tokenizer, aspects: Sequence[str]) -> None:
    """Raise unless every aspect's prompt starts with a word piece of its own (prompt-code start)."""
    codes = prompt_codes(tokenizer, [f"{aspect}: ." for aspect in aspects])
    for i, aspect in enumerate(aspects):
        for other, code in zip(aspects[i + 1 :], codes[i + 1 :], strict=True):
            if code == codes[i]:
                raise ConfigError(
                    f"decoder-start: 'prompt-code': the aspects {aspect!r} and {other!r} begin with the same "
                    f"word piece {tokenizer.convert_ids_to_tokens(code)!r}, so the decoder could not tell "
                    "them apart. Rename a summary field, or use decoder-start='model'."
                )


@dataclass(frozen=True)
class Encoded:
    """Token ids of examples, unpadded: ``sources[i]`` and ``targets[i]`` of example ``i``.

    Kept as int32 arrays (a Python list of ints costs ~36 bytes a token; a worker process
    caches the token ids of every user it serves).
    """

    sources: tuple[np.ndarray, ...]
    targets: tuple[np.ndarray, ...]
    pad_id: int
    codes: tuple[int, ...] | None = None  # decoder start per example (prompt-code start), else None

    def __len__(self) -> int:
        return len(self.sources)

    def target_tokens(self) -> int:
        return sum(len(t) for t in self.targets)

    def to_json(self) -> dict:
        return {
            "sources": [r.tolist() for r in self.sources],
            "targets": [r.tolist() for r in self.targets],
            "pad-id": self.pad_id,
            "codes": None if self.codes is None else list(self.codes),
        }

    @classmethod
    def from_json(cls, payload: dict) -> Encoded:
        def rows(key: str) -> tuple[np.ndarray, ...]:
            return tuple(np.asarray(r, dtype=np.int32) for r in payload[key])

        codes = payload.get("codes")
        return cls(
            rows("sources"),
            rows("targets"),
            int(payload["pad-id"]),
            None if codes is None else tuple(int(c) for c in codes),
        )


def encode(
    tokenizer,
    examples: Sequence[Example],
    max_source_tokens: int,
    max_target_tokens: int,
    prompt_code_start: bool = False,
) -> Encoded:
    """Tokenize every example once (truncated, not padded); ``prompt_code_start``: also keep
    each example's control code, the decoder's first input (:func:`prompt_codes`)."""
    if not examples:
        return Encoded((), (), int(tokenizer.pad_token_id), () if prompt_code_start else None)
    sources = tokenizer([e.source for e in examples], max_length=max_source_tokens, truncation=True)
    targets = tokenizer(
        text_target=[e.summary for e in examples], max_length=max_target_tokens, truncation=True
    )
    return Encoded(
        tuple(np.asarray(ids, dtype=np.int32) for ids in sources["input_ids"]),
        tuple(np.asarray(ids, dtype=np.int32) for ids in targets["input_ids"]),
        int(tokenizer.pad_token_id),
        tuple(prompt_codes(tokenizer, [e.source for e in examples])) if prompt_code_start else None,
    )


def _pad(rows: Sequence[np.ndarray], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), value, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def collate(encoded: Encoded, indices: Sequence[int]) -> Batch:
    """The examples ``indices`` as one right-padded batch; label padding is -100."""
    input_ids, attention_mask = _pad([encoded.sources[i] for i in indices], encoded.pad_id)
    labels, label_mask = _pad([encoded.targets[i] for i in indices], encoded.pad_id)
    decoder_input_ids = None
    if encoded.codes is not None:
        codes = torch.tensor([encoded.codes[i] for i in indices], dtype=labels.dtype)
        decoder_input_ids = torch.cat([codes[:, None], labels[:, :-1]], dim=1)
    return Batch(input_ids, attention_mask, labels.masked_fill(label_mask == 0, -100), decoder_input_ids)


def batches_of(
    encoded: Encoded, batch_size: int, generator: torch.Generator | None = None, group_by_length: bool = False
) -> list[Batch]:
    """All examples in batches of ``batch_size``; shuffled when a generator is given.

    ``group_by_length``: examples of similar source length share a batch, so less compute
    goes to padding (documents run from a few dozen tokens to the truncation length). As
    Hugging Face's length-grouped sampler does: shuffle, sort each run of
    :data:`LENGTH_GROUP` batches by length, then shuffle the order of the batches, so
    batches stay random in content and order.
    """
    order = list(range(len(encoded)))
    if generator is not None:
        order = torch.randperm(len(encoded), generator=generator).tolist()
    if group_by_length:
        group = LENGTH_GROUP * batch_size
        order = [
            i
            for start in range(0, len(order), group)
            for i in sorted(order[start : start + group], key=lambda i: -len(encoded.sources[i]))
        ]
    chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length and generator is not None:
        chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]
    return [collate(encoded, chunk) for chunk in chunks]


LENGTH_GROUP = 8  # batches whose examples are sorted by length together


def make_batches(
    tokenizer,
    examples: Sequence[Example],
    batch_size: int,
    max_source_tokens: int,
    max_target_tokens: int,
    generator: torch.Generator | None = None,
    prompt_code_start: bool = False,
) -> list[Batch]:
    """Tokenize and pad examples into batches; shuffled when a generator is given."""
    encoded = encode(tokenizer, examples, max_source_tokens, max_target_tokens, prompt_code_start)
    return batches_of(encoded, batch_size, generator)
