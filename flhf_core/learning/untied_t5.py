"""T5 with an LM head of its own, so that the head can stay on a client (``local-head``)."""

from __future__ import annotations

from typing import ClassVar

from transformers import T5Config, T5ForConditionalGeneration


class UntiedT5ForConditionalGeneration(T5ForConditionalGeneration):
    """T5 whose LM head is a parameter of its own (the T5 v1.1 layout).

    Only the encoder and decoder input embeddings share ``shared.weight``. An
    untied head is not rescaled by d_model^-0.5 before projection (T5 v1.1).
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: T5Config) -> None:
        config.scale_decoder_outputs = False
        super().__init__(config)
