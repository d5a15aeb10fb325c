"""Model and tokenizer factory, and parameters as Flower ``ArrayRecord`` s.

``model = "tiny-t5"`` builds a small T5 from a ``T5Config`` (sizes ``xs``, ``s``,
``m``) whose LM head is *untied* from the input embedding, so that the head
can later stay on the client. Transformers 5 forces T5's head to be tied, so
:class:`UntiedT5ForConditionalGeneration` declares only the encoder/decoder
embeddings as tied; load its ``save_pretrained`` folders with
:func:`load_pretrained` (plain ``AutoModelForSeq2SeqLM`` would re-tie the head).

Its tokenizer is trained once on the corpus with ``tokenizers`` (a Unigram
model, T5's special-token ids) and shipped in ``flhf_core/assets/``, built by
``flhf build-tokenizer``. For another dataset the ServerApp trains one at the
start and sends it to the clients with its sha256; clients refuse a mismatch.
Any other ``model`` is a Hugging Face seq2seq checkpoint, by name or local path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.utils import logging as hf_logging

from flhf_core.config import ConfigError, RunConfig
from flhf_core.data import partitions
from flhf_core.data.codes import all_codes
from flhf_core.learning import code_bandit, conditioning, warm_start
from flhf_core.learning.copy_t5 import CopyT5ForConditionalGeneration
from flhf_core.learning.untied_t5 import UntiedT5ForConditionalGeneration

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SHIPPED_TOKENIZER = ASSETS / "aclsum-tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5

# d_model, d_ff, layers (encoder = decoder), heads, d_kv
TINY_T5_PRESETS = {
    "xs": dict(d_model=64, d_ff=256, num_layers=1, num_heads=4, d_kv=16),
    "s": dict(d_model=128, d_ff=512, num_layers=2, num_heads=4, d_kv=32),
    "m": dict(d_model=256, d_ff=1024, num_layers=4, num_heads=4, d_kv=64),
}


class TokenizerMismatch(RuntimeError):
    """The client's tokenizer is not the one the server announced."""


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a Unigram (SentencePiece-style) tokenizer with T5's special tokens."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(r"\s+", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tokenizer


def corpus_texts(corpus, documents=None) -> list[str]:
    """The documents' texts and summaries (default: the whole corpus's), a tokenizer's training text."""
    documents = corpus.documents if documents is None else documents
    return [d.text for d in documents] + [s for d in documents for _, s in d.summaries]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wrap_tokenizer(tokenizer_json: bytes) -> PreTrainedTokenizerFast:
    """A transformers tokenizer from serialized ``tokenizers`` JSON."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json.decode()),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )


@dataclass(frozen=True)
class TokenizerSpec:
    """What the server tells clients about the tokenizer, every round."""

    sha256: str
    payload: bytes = b""  # the tokenizer JSON, only when it is not shipped with the package


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides token ids: the serialized tokenizer without its runtime state.

    Calling a tokenizer with ``truncation``/``padding`` stores those settings in its
    serialized form; they change no token id, so they are left out of the hash.
    """
    serialized = json.loads(tokenizer.backend_tokenizer.to_str())
    serialized["truncation"] = serialized["padding"] = None
    return sha256(json.dumps(serialized, sort_keys=True).encode())


def server_tokenizer(
    config: RunConfig, corpus, trained: bytes | None = None
) -> tuple[PreTrainedTokenizerBase, TokenizerSpec]:
    """The run's tokenizer, and how clients get it.

    tiny-t5 on aclsum's official split uses the shipped file (trained on the official train and
    validation papers); tiny-t5 on other data, or on aclsum split by hash, trains one here on
    the users' training documents and sends it along (``trained``: the one a resumed run trained before, as its
    checkpoint kept it: training is not deterministic, and the weights need their vocabulary);
    a hub model brings its own (only the hash travels).
    """
    if config.model != "tiny-t5":
        tokenizer = load_hub_tokenizer(config.model)
        return tokenizer, TokenizerSpec(tokenizer_fingerprint(tokenizer))
    if config.dataset == "aclsum" and partitions.heldout_by(corpus, config) == "official":
        # built from the official train and validation papers only (flhf build-tokenizer)
        tokenizer = shipped_tokenizer()
        return tokenizer, TokenizerSpec(tokenizer_fingerprint(tokenizer))
    if trained is not None:
        payload = trained
    else:  # only what users train on: a held-out (or reward) document's words shape no tokenizer
        training = [d for d in corpus.documents if partitions.document_role(d, config) == partitions.TRAIN]
        payload = train_tokenizer(corpus_texts(corpus, training), vocab_size=4000).to_str().encode()
    tokenizer = wrap_tokenizer(payload)
    return tokenizer, TokenizerSpec(tokenizer_fingerprint(tokenizer), payload)


def client_tokenizer(config: RunConfig, spec: TokenizerSpec) -> PreTrainedTokenizerBase:
    """The tokenizer a client uses, checked against the server's hash."""
    if config.model != "tiny-t5":
        tokenizer = load_hub_tokenizer(config.model)
    elif spec.payload:
        tokenizer = wrap_tokenizer(spec.payload)
    else:
        tokenizer = shipped_tokenizer()
    actual = tokenizer_fingerprint(tokenizer)
    if actual != spec.sha256:
        raise TokenizerMismatch(
            f"tokenizer hash {actual[:12]} differs from the server's {spec.sha256[:12]}: "
            "client and server would not agree on token ids."
        )
    return tokenizer


def shipped_tokenizer() -> PreTrainedTokenizerFast:
    if not SHIPPED_TOKENIZER.is_file():
        raise FileNotFoundError(f"{SHIPPED_TOKENIZER} is missing; rebuild it with `flhf build-tokenizer`.")
    return wrap_tokenizer(SHIPPED_TOKENIZER.read_bytes())


def load_hub_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name == warm_start.NAME:
        return warm_start.load_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model: cannot load a tokenizer for {name!r}: {error}") from None


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
def build_tiny_t5(
    size: str, vocab_size: int, seed: int, copy_attention: bool = False
) -> UntiedT5ForConditionalGeneration:
    """A tiny T5 from config (seeded); ``copy_attention``: with a pointer-generator output."""
    preset = TINY_T5_PRESETS[size]
    config = T5Config(
        vocab_size=vocab_size,
        d_model=preset["d_model"],
        d_ff=preset["d_ff"],
        d_kv=preset["d_kv"],
        num_layers=preset["num_layers"],
        num_decoder_layers=preset["num_layers"],
        num_heads=preset["num_heads"],
        dropout_rate=0.1,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    architecture = CopyT5ForConditionalGeneration if copy_attention else UntiedT5ForConditionalGeneration
    config.architectures = [architecture.__name__]
    torch.manual_seed(seed)
    model = architecture(config)
    # Transformers initializes the head with std 1, tuned for a tied, rescaled head:
    # untied, that gives logits of std ~sqrt(d_model) and an initial loss near 20.
    # Mesh TensorFlow's T5 v1.1 uses std d_model^-0.5 (logits of unit scale).
    torch.nn.init.normal_(model.lm_head.weight, std=preset["d_model"] ** -0.5)
    return model


def build_model(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The run's initial model: tiny-t5 from config (seeded) or a pretrained checkpoint."""
    if config.model == "tiny-t5":
        return build_tiny_t5(config.tiny_t5_size, len(tokenizer), config.seed, config.copy_attention)
    if config.model == warm_start.NAME:
        return warm_start.build(config.seed)
    return load_pretrained(config.model)


def load_pretrained(name_or_path: str | Path) -> PreTrainedModel:
    """Load a ``save_pretrained`` folder (ours or any seq2seq) or a hub name."""
    config_file = Path(name_or_path) / "config.json"
    try:
        architectures = (
            json.loads(config_file.read_text()).get("architectures", []) if config_file.is_file() else []
        )
        for ours in (CopyT5ForConditionalGeneration, UntiedT5ForConditionalGeneration):
            if ours.__name__ in architectures:
                return ours.from_pretrained(name_or_path)
        return AutoModelForSeq2SeqLM.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model: cannot load {str(name_or_path)!r}: {error}") from None


def select_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was requested but no CUDA device is available.")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


# --------------------------------------------------------------------------
# Parameters <-> ArrayRecord
# --------------------------------------------------------------------------
def canonical_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters by their plain-model names, each once (tied aliases are skipped).

    A LoRA adapter (peft) renames a wrapped weight ``q.weight`` to ``q.base_layer.weight``;
    it is reported under its plain name, so shared parameters have the same names on
    every client and on the server, with or without an adapter.
    """
    return {name.replace(".base_layer.", "."): p for name, p in model.named_parameters()}


def parameters_to_record(model: torch.nn.Module, names: Collection[str] | None = None) -> ArrayRecord:
    """The parameters named ``names`` (default: all), as numpy arrays."""
    params = canonical_parameters(model)
    selected = params if names is None else {name: params[name] for name in sorted(names)}
    return ArrayRecord({name: Array(p.detach().cpu().float().numpy()) for name, p in selected.items()})


def record_to_parameters(
    model: torch.nn.Module, record: ArrayRecord, names: Collection[str] | None = None
) -> None:
    """Load a record holding exactly the parameters ``names`` (default: all) into ``model``.

    Names, shapes and values are checked before anything is written.
    """
    params = canonical_parameters(model)
    expected = set(params if names is None else names)
    missing, unexpected = expected - record.keys(), record.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"parameter record does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    values = {}
    for name, array in record.items():
        value = array.numpy()
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"parameter {name}: shape {value.shape} != model's {tuple(params[name].shape)}")
        if not np.isfinite(value).all():
            raise ValueError(f"parameter {name} has non-finite values")
        values[name] = value
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(torch.from_numpy(value).to(params[name].dtype))


# --------------------------------------------------------------------------
# Personalization: which parameters stay on the client
# --------------------------------------------------------------------------
# Every linear layer of a transformer block, by the module names of each family: T5's attention
# q, k, v, o and feed-forward wi/wo (wi_0 and wi_1 in gated variants such as flan-t5); BART's
# (and its kin's: mBART, Pegasus, Marian) q_proj, k_proj, v_proj, out_proj and fc1/fc2; BERT's.
# Adapters on q and v alone (the LoRA paper's choice) personalized too little here: with them,
# the personalized model beat the global one for only one or two of three aspect users; with
# all of them, for all three (4 seeds).
LORA_TARGETS = (
    *("q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1"),
    *("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    *("query", "key", "value", "dense"),  # BERT's (minilm-warm-start): attention and feed-forward
)


def head_is_tied(model: PreTrainedModel) -> bool:
    head = model.get_output_embeddings()
    return head is None or head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def personal_parameter_names(model: PreTrainedModel, mode: str, personal_layers: int = 1) -> frozenset[str]:
    """Names of the parameters that never leave the client under ``mode``.

    ``local-head`` (FedPer, Arivazhagan et al., 2019, https://arxiv.org/abs/1912.00818):
    the untied LM head, the decoder's final layer norm and its last ``personal_layers``
    blocks. ``lora``: the user's LoRA adapter (:func:`add_lora`). ``soft-prompt``: the
    user's conditioning (:mod:`~flhf_core.learning.conditioning`). ``all``: every parameter
    (the local-only baseline: nothing travels).
    """
    if mode == "none":
        return frozenset()
    names = canonical_parameters(model)
    if mode == "all":
        return frozenset(names)
    client_only = {"soft-prompt": conditioning.MODULE, "code-bandit": code_bandit.MODULE}
    if mode in client_only:
        personal = {n for n in names if n.startswith(f"{client_only[mode]}.")}
        if not personal:
            raise ValueError(
                f"personalization {mode!r}: the model has no {client_only[mode]} (with_personal_parameters)"
            )
        return frozenset(personal)
    if mode == "lora":
        personal = {n for n in names if "lora_" in n}
        if not personal:
            raise ValueError("personalization 'lora': the model has no adapter; call add_lora first")
        return frozenset(personal)
    if mode != "local-head":
        raise ConfigError(
            f"personalization: {mode!r} is not allowed; choose none, local-head, lora, soft-prompt or code-bandit."
        )
    if head_is_tied(model):
        raise ConfigError(
            "personalization: 'local-head' keeps the LM head on the client, but this model ties its head to "
            "the input embedding (shared by the encoder). Use model = 'tiny-t5' (untied head), a checkpoint "
            "with an untied head, or personalization = 'lora'."
        )
    decoder_blocks = getattr(getattr(model, "decoder", None), "block", None)
    if decoder_blocks is None:
        raise ConfigError(
            f"personalization: 'local-head' keeps T5's decoder blocks and final layer norm on the client; "
            f"{type(model).__name__} is laid out otherwise. Use personalization = 'lora'."
        )
    blocks = len(decoder_blocks)
    if not 0 <= personal_layers <= blocks:
        raise ConfigError(f"personal-layers: {personal_layers} is outside [0, {blocks}] (decoder blocks).")
    prefixes = ["lm_head.", "decoder.final_layer_norm."]
    prefixes += [f"decoder.block.{i}." for i in range(blocks - personal_layers, blocks)]
    return frozenset(n for n in names if any(n.startswith(p) for p in prefixes))


# personalizations whose parameters exist on clients only (the server's model has none)
CLIENT_ONLY_PERSONALIZATIONS = ("lora", "soft-prompt", "code-bandit")


def with_personal_parameters(model: PreTrainedModel, config: RunConfig, seed: int) -> PreTrainedModel:
    """``model`` with the personal parameters that exist on clients only: a LoRA adapter
    (``lora``), a user conditioning (``soft-prompt``) or a bandit's state over the control codes
    (``code-bandit``); otherwise unchanged (``local-head``'s personal layers are in every model)."""
    if config.personalization == "lora":
        return add_lora(model, config.lora_rank, seed=seed)
    if config.personalization == "soft-prompt":
        return conditioning.add_conditioning(model, config.soft_prompt_tokens)
    if config.personalization == "code-bandit":
        return code_bandit.add_code_bandit(model, len(all_codes(config.aspects)))
    return model


def add_lora(model: PreTrainedModel, rank: int, seed: int) -> PreTrainedModel:
    """Inject a LoRA adapter (Hu et al., 2021, https://arxiv.org/abs/2106.09685) in place.

    The adapter's B matrices start at zero, so the model is unchanged until it trains.
    Unlike peft's default, the base weights stay trainable: they are federated as usual.
    """
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=lora_targets(model))
    model = inject_adapter_in_model(config, model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_targets(model: torch.nn.Module) -> list[str]:
    """The :data:`LORA_TARGETS` this model has as linear layers (peft matches a module by the
    last part of its name): a model family's own names, whichever family it is."""
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [name for name in LORA_TARGETS if name in linear]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no linear layer named any of {', '.join(LORA_TARGETS)} "
            "(T5's, BART's and BERT's names), where the adapter goes"
        )
    return targets


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in a record (what dominates a message)."""
    return sum(len(array.data) for array in record.values())
