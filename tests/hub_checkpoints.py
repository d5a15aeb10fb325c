"""Small stand-ins for the Hugging Face checkpoints of the hub presets, saved as the hub holds them.

The machines that run the tests cannot reach the hub, so ``google/flan-t5-small`` and
``facebook/bart-base`` are replaced by folders with the same architecture family and files:
a ``config.json`` as the hub's (flan-t5: gated-gelu, an LM head of its own; BART: a head tied
to the shared embedding, pad 1, ``</s>`` as the decoder start), random weights of tiny
dimensions, and a tokenizer of the same kind (T5's Unigram with its 100 ``<extra_id_*>``
tokens; BART's byte-level BPE with ``<s> ... </s>``) trained on a few hundred of the corpus's
texts and written by ``save_pretrained``. Loading such a folder takes the code path a hub name
takes (``from_pretrained`` accepts both).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BartConfig, BartModel, BartTokenizer, T5Config, T5Tokenizer

from flhf_core.config import RunConfig
from flhf_core.data.corpus import load_corpus
from flhf_core.learning.model import UntiedT5ForConditionalGeneration, corpus_texts, train_tokenizer

VOCABULARY = 800  # tokens the tokenizers learn (the real ones: 32000 and 50265)
TEXTS = 400  # corpus texts they learn them from


@functools.cache
def training_texts() -> tuple[str, ...]:
    return tuple(corpus_texts(load_corpus(RunConfig()))[:TEXTS])


def save_flan_t5_like(folder: Path, seed: int = 0) -> Path:
    """A tiny flan-t5: gated-gelu feed-forward, untied LM head, T5's tokenizer with extra ids."""
    unigram = json.loads(train_tokenizer(list(training_texts()), VOCABULARY).to_str())["model"]
    tokenizer = T5Tokenizer(vocab=[tuple(piece) for piece in unigram["vocab"]], extra_ids=100)
    config = T5Config(
        # as flan-t5's 32128 for 32100 tokens: the model has ids the tokenizer never produces
        vocab_size=len(tokenizer) + 4,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    # Transformers 5 builds a plain T5ForConditionalGeneration with a tied head; this class
    # gives the untied head whose weights a flan-t5 checkpoint holds
    model = UntiedT5ForConditionalGeneration(config)
    torch.nn.init.normal_(model.lm_head.weight, std=config.d_model**-0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # the hub's config.json, written by transformers 4: the plain class, and the untied head
    # said in so many words (transformers 5 reads it to keep the head and skip the rescaling)
    saved = json.loads((folder / "config.json").read_text())
    saved.pop("scale_decoder_outputs", None)
    saved.update(architectures=["T5ForConditionalGeneration"], tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    return folder


def save_bart_like(folder: Path, seed: int = 0) -> Path:
    """A tiny bart-base: saved as the hub holds it, a ``BartModel`` (no LM head of its own:
    ``BartForConditionalGeneration`` ties it to the shared embedding), byte-level BPE."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCABULARY,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],  # BART's ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(training_texts()), trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = BartTokenizer(vocab=trained["vocab"], merges=merges)  # adds <mask> last, as BART's
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        # bart-base's special ids and its generation settings (which the run must override)
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
    )
    torch.manual_seed(seed)
    BartModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SAVERS = {"flan-t5": save_flan_t5_like, "bart": save_bart_like}
