"""Seconds a user spends on a round with the hub presets' models (flan-t5-small, bart-base), built
here with their real architecture and vocabulary size but random weights: no hub needed.

    python bench/hub_models.py [--presets NAME ...] [--steps S] [--eval-examples N] [--threads T] [key=value ...]

For each preset (``configs/<name>.toml``, plus the overrides): the model from its architecture
written out by hand (:data:`ARCHITECTURES`, the hub's ``config.json`` values), random weights,
with the preset's personal LoRA adapter; a stand-in tokenizer of the same kind and vocabulary
size (T5's Unigram with 100 extra ids, BART's byte-level BPE; trained on the corpus, which
yields fewer tokens than the real ones hold, and filled up with tokens no text produces); and
user 0 of the preset's users on its real aclsum examples. Timed, one after the other:

- ``sft-update``: the supervised local update of one round as a client runs it: the preset's
  personal epochs on the adapter alone, then its local epochs on the shared parameters (FedRep's
  order), in batches of ``batch-size``. With ``--steps S``: S steps of each phase, each phase
  scaled up to its steps in a round (``*-estimated``: true);
- ``feedback-update``: one feedback round of the preset's algorithm as a client runs it: one pass
  per set of parameters it trains (the personal adapter first, then the shared weights), each of
  ``feedback-steps`` steps of ``feedback-prompts`` x ``samples-per-prompt`` samples; with
  ``--steps S``, S steps of each pass scaled up;
- ``evaluation``: the model on the user's validation examples (``--eval-examples``, default the
  preset's ``eval-max-examples``): loss, greedy summaries of ``max-new-tokens``, ROUGE.

Random weights rarely stop where a trained model does, so ``</s>`` is taken away from decoding:
every summary and sample runs to ``max-new-tokens``, the longest a round's decoding can take.
Figures: seconds, tokens, steps (``mean-source-tokens``/``mean-target-tokens`` say how long the
stand-in tokenizer's examples are). Writes ``bench/results/hub_models.json``.
Scaled-up figures count what an update sets up once (its optimizer; a feedback round's frozen
reference copy) in every step: they overestimate, the more the fewer steps were measured.
``--steps 1 --eval-examples 2`` checks that the script runs (its figures mean little).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
from common import write_result
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5Tokenizer,
)

from flhf_core.client.documents import UserDocuments, corpus_documents
from flhf_core.client.update import only_trainable, passes_of
from flhf_core.config import RunConfig
from flhf_core.data.corpus import load_corpus
from flhf_core.learning.algorithms import FEEDBACK_ALGORITHMS
from flhf_core.learning.algorithms.rollout import FeedbackConfig
from flhf_core.learning.algorithms.scorer import Scorer
from flhf_core.learning.algorithms.sft import SFTConfig, train_sft
from flhf_core.learning.batches import encode
from flhf_core.learning.metrics import evaluate_model
from flhf_core.learning.model import (
    UntiedT5ForConditionalGeneration,
    canonical_parameters,
    corpus_texts,
    personal_parameter_names,
    select_device,
    train_tokenizer,
    with_personal_parameters,
)
from flhf_core.runs.cli import merged_config

# The hub's config.json of each checkpoint, written out (the hub is not needed to time them).
ARCHITECTURES = {
    "flan-t5-small": T5Config(
        vocab_size=32128,  # 32100 tokens (32000 pieces, 100 extra ids), padded
        d_model=512,
        d_ff=1024,
        d_kv=64,
        num_layers=8,
        num_decoder_layers=8,
        num_heads=6,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    ),
    "bart-base": BartConfig(
        vocab_size=50265,
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        max_position_embeddings=1024,
        activation_function="gelu",
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.1,
        scale_embedding=False,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
    ),
}
T5_PIECES = 32000  # flan-t5's SentencePiece pieces, before its 100 extra ids


def filler(count: int) -> list[str]:
    """Tokens no text produces: they fill a stand-in vocabulary up to the real size."""
    return [f"<unused-{i}>" for i in range(count)]


def t5_tokenizer(texts: list[str]) -> T5Tokenizer:
    """T5's kind: a Unigram with ``<pad>``, ``</s>``, ``<unk>`` first and 100 ``<extra_id_*>``."""
    pieces = [tuple(p) for p in json.loads(train_tokenizer(texts, T5_PIECES).to_str())["model"]["vocab"]]
    pieces += [(token, -100.0) for token in filler(T5_PIECES - len(pieces))]
    return T5Tokenizer(vocab=pieces, extra_ids=100)


def bart_tokenizer(texts: list[str], size: int) -> BartTokenizer:
    """BART's kind: byte-level BPE, ``<s> <pad> </s> <unk>`` first and ``<mask>`` last."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size - 1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab = dict(trained["vocab"])
    vocab.update({token: len(vocab) + i for i, token in enumerate(filler(size - 1 - len(vocab)))})
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return BartTokenizer(vocab=vocab, merges=merges)  # adds <mask> as the last id


def build(name: str, texts: list[str], seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The preset's model with random weights, and its stand-in tokenizer."""
    architecture = ARCHITECTURES[name]
    torch.manual_seed(seed)
    if isinstance(architecture, T5Config):
        tokenizer = t5_tokenizer(texts)
        # flan-t5's head is its own; transformers 5 would tie a plain T5ForConditionalGeneration's
        model = UntiedT5ForConditionalGeneration(architecture)
    else:
        tokenizer = bart_tokenizer(texts, architecture.vocab_size)
        model = BartForConditionalGeneration(architecture)
    assert len(tokenizer) <= architecture.vocab_size, (name, len(tokenizer))
    model.generation_config.eos_token_id = None  # decode to max-new-tokens (see the docstring)
    return model, tokenizer


def sft_phases(model: PreTrainedModel, config: RunConfig) -> list[tuple[str, frozenset[str], int]]:
    """(phase, trainable parameters, epochs) of a round's supervised update, as a client runs it
    (flhf_core/client/update.py, local_sft)."""
    everything = frozenset(canonical_parameters(model))
    personal = personal_parameter_names(model, config.personal_scope, config.personal_layers)
    if personal and personal != everything and config.personal_epochs > 0:
        return [
            ("personal", personal, config.personal_epochs),
            ("shared", everything - personal, config.local_epochs),
        ]
    return [("all", everything, config.local_epochs)]


def time_sft(model, tokenizer, data: UserDocuments, config: RunConfig, steps: int | None) -> dict:
    sft = SFTConfig.from_run_config(config, config.learning_rate, seed=0)
    examples = list(data.train)
    steps_per_epoch = math.ceil(len(examples) / sft.batch_size)
    figures: dict = {"examples": len(examples), "seconds": 0.0, "estimated": steps is not None}
    for phase, names, epochs in sft_phases(model, config):
        round_steps = steps_per_epoch * epochs
        measured = examples if steps is None else examples[: steps * sft.batch_size]
        with only_trainable(model, names):
            stats = train_sft(model, tokenizer, measured, replace(sft, epochs=epochs if steps is None else 1))
        seconds = stats.seconds if steps is None else stats.seconds / stats.steps * round_steps
        figures[phase] = {
            "round-steps": round_steps,
            "measured-steps": stats.steps,
            "seconds-per-step": stats.seconds / stats.steps,
            "seconds": seconds,
            "tokens-per-second": stats.tokens_per_second,
        }
        figures["seconds"] += seconds
    return figures


def time_feedback(model, tokenizer, data: UserDocuments, config: RunConfig, steps: int | None) -> dict:
    """A feedback round as a client runs it: the algorithm once per pass (the personal parameters
    first, then the shared ones: FedRep's order), each pass ``steps`` steps scaled up to a round's."""
    feedback = FeedbackConfig.from_run_config(config)
    measured = feedback.steps if steps is None else min(steps, feedback.steps)
    personal = personal_parameter_names(model, config.personal_scope, config.personal_layers)
    passes = passes_of(config, personal, frozenset(canonical_parameters(model)) - personal)
    scorer = Scorer(
        data.profile, config.ratings_per_round, measured * len(passes), feedback.samples_per_prompt
    )
    update = FEEDBACK_ALGORITHMS[config.feedback_algorithm]
    per_pass = {}
    for prefix, names, rate in passes:
        started = time.perf_counter()
        with only_trainable(model, names) if names is not None else nullcontext():
            update(
                model,
                tokenizer,
                list(data.feedback),
                scorer,
                replace(feedback, steps=measured, learning_rate=rate),
                np.random.default_rng(0),
            )
        per_pass[prefix] = (time.perf_counter() - started) / measured * feedback.steps
    return {
        "algorithm": config.feedback_algorithm,
        "round-steps": feedback.steps,
        "measured-steps": measured,
        "passes": list(per_pass),
        "seconds-per-pass": per_pass,
        "seconds": sum(per_pass.values()),
        "estimated": measured != feedback.steps,
        "samples-per-step": feedback.prompts_per_step * feedback.samples_per_prompt,
    }


def time_evaluation(model, tokenizer, data: UserDocuments, config: RunConfig, count: int) -> dict:
    examples = list(data.validation[:count] if count > 0 else data.validation)
    started = time.perf_counter()
    metrics = evaluate_model(model, tokenizer, examples, config)
    elapsed = time.perf_counter() - started
    return {
        "examples": len(examples),
        "seconds": elapsed,
        "seconds-per-example": elapsed / len(examples),
        "loss": metrics["loss"],
    }


def measure(name: str, overrides: list[str], args: argparse.Namespace, texts: list[str]) -> dict:
    config = RunConfig.from_mapping(merged_config(name, overrides))
    model, tokenizer = build(name, texts, config.seed)
    parameters = sum(p.numel() for p in canonical_parameters(model).values())
    model = with_personal_parameters(model, config, seed=config.seed)
    model.to(select_device(config.device))
    data = corpus_documents(config, 0, config.min_available_nodes)
    encoded = encode(
        tokenizer, data.train, config.max_source_tokens, config.max_target_tokens, config.prompt_code_start
    )
    # warm-up: the first step allocates what every later one reuses
    train_sft(
        model, tokenizer, list(data.train[: config.batch_size]), SFTConfig.from_run_config(config, 0.0, 0)
    )
    figures = {
        "model": config.model,
        "parameters": parameters,
        "vocabulary": len(tokenizer),
        "personalization": config.personalization,
        "batch-size": config.batch_size,
        "mean-source-tokens": float(np.mean([len(s) for s in encoded.sources])),
        "mean-target-tokens": float(np.mean([len(t) for t in encoded.targets])),
        "max-new-tokens": config.max_new_tokens,
        "device": str(select_device(config.device)),
    }
    figures["sft-update"] = time_sft(model, tokenizer, data, config, args.steps)
    figures["feedback-update"] = time_feedback(model, tokenizer, data, config, args.steps)
    count = config.eval_max_examples if args.eval_examples is None else args.eval_examples
    figures["evaluation"] = time_evaluation(model, tokenizer, data, config, count)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="run-config overrides for every preset"
    )
    parser.add_argument("--presets", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--steps", type=int, help="time this many steps of each update, scaled to a round")
    parser.add_argument(
        "--eval-examples", type=int, help="validation examples evaluated (default: eval-max-examples)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error("--steps: at least 1")
    torch.set_num_threads(args.threads)
    texts = corpus_texts(load_corpus(RunConfig()))
    results = {"steps": args.steps, "threads": args.threads, "presets": {}}
    for name in args.presets:
        figures = results["presets"][name] = measure(name, args.overrides, args, texts)
        sft, feedback, evaluation = figures["sft-update"], figures["feedback-update"], figures["evaluation"]
        estimated = " (estimated)" if sft["estimated"] else ""
        print(
            f"{name}: {figures['parameters'] / 1e6:.0f}M parameters, vocabulary {figures['vocabulary']}, "
            f"{figures['mean-source-tokens']:.0f}/{figures['mean-target-tokens']:.0f} source/target tokens\n"
            f"  supervised update {sft['seconds']:.1f} s{estimated} ({sft['examples']} examples)\n"
            f"  feedback update   {feedback['seconds']:.1f} s{' (estimated)' if feedback['estimated'] else ''} "
            f"({' + '.join(feedback['passes'])} passes of {feedback['round-steps']} steps of "
            f"{feedback['samples-per-step']} samples)\n"
            f"  evaluation        {evaluation['seconds']:.1f} s ({evaluation['examples']} examples)",
            flush=True,
        )
    write_result("hub_models", results)


if __name__ == "__main__":
    main()
