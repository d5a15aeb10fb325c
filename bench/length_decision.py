"""Whether a run's global model reads a code's length: where does it end a summary?

    python bench/length_decision.py results/personalize/sft-seed-0

For each code, teacher-forced on that code's targets for held-out papers (the first 32 with
every aspect's reference), the model's probability of ending the summary right after the
target's first full stop. Single-aspect ``short`` and ``medium`` targets end there; ``long``
targets and mixes go on. A model that reads the code gives the first a high probability and
the others a low one; greedy decoding stops wherever it is the most likely token. Prints one
line per code and writes ``bench/results/length-decision-<results folder>-<run>.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import write_result
from transformers import AutoTokenizer

from flhf_core.common import read_json
from flhf_core.config import RunConfig
from flhf_core.data import codes, partitions
from flhf_core.data.corpus import load_corpus
from flhf_core.learning.model import load_pretrained

DOCUMENTS = 32


def end_after_first_sentence(model, tokenizer, config: RunConfig, docs, code: codes.Code) -> float:
    """Mean p(</s>) at the position after each target's first full stop."""
    sources = [partitions.request(doc, code.prompt, config) for doc in docs]
    batch = tokenizer(
        sources, max_length=config.max_source_tokens, truncation=True, padding=True, return_tensors="pt"
    )
    targets = tokenizer(
        text_target=[codes.target(doc, code) for doc in docs],
        max_length=config.max_target_tokens,
        truncation=True,
        padding=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        labels = targets.masked_fill(targets == tokenizer.pad_token_id, -100)
        probabilities = model(**batch, labels=labels).logits.softmax(-1)
    ends = []
    for row, ids in enumerate(targets.tolist()):
        stop = next((i for i, t in enumerate(ids) if tokenizer.decode([t]).strip().endswith(".")), None)
        if stop is not None and stop + 1 < len(ids):
            ends.append(probabilities[row, stop + 1, tokenizer.eos_token_id].item())
    return float(np.mean(ends))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    config = RunConfig.from_saved(read_json(args.run_dir / "config.json"))
    corpus = load_corpus(config)
    model = load_pretrained(args.run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.run_dir / "model")
    held_out = set(partitions.heldout_doc_ids(corpus, config))
    docs = [d for d in corpus.documents if d.doc_id in held_out and all(d.summary(a) for a in corpus.aspects)]
    docs = docs[:DOCUMENTS]
    figures = {}
    for code in codes.all_codes(corpus.aspects):
        figures[code.name] = end_after_first_sentence(model, tokenizer, config, docs, code)
        print(f"{code.name:28s} p(end after the first sentence) {figures[code.name]:.2f}")
    write_result(
        f"length-decision-{args.run_dir.resolve().parent.name}-{args.run_dir.name}",
        {"run": str(args.run_dir), "documents": len(docs), **figures},
    )


if __name__ == "__main__":
    main()
