"""Decoding levers without retraining: the final models of ``bench/default_quality.py`` runs,
decoded again with other settings, on the users' validation documents and the held-out ones.

    python bench/decoding.py defaults                  # every setting, every seed of that tag
    python bench/decoding.py defaults --settings as-run erp1.3

Decoding changes no weight, so a setting can be screened on a trained model in seconds
instead of a run in minutes. Choose on ``val`` (the users' validation documents, the same
figure the runs report per user); ``heldout`` is what the default run reports and is shown so
the target can be read, not to choose on. Writes ``bench/results/decoding-<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from common import PROJECT_DIR, write_result
from transformers import PreTrainedTokenizerFast

from flhf_core.config import RunConfig
from flhf_core.data.corpus import load_corpus
from flhf_core.data.partitions import heldout_examples, user_partition
from flhf_core.learning.generate import DecodingConfig, generate_summaries
from flhf_core.learning.metrics import by_aspect
from flhf_core.learning.model import load_pretrained
from flhf_core.users.rouge import rouge

SETTINGS: dict[str, dict] = {  # name -> DecodingConfig fields changed from the run's own
    "as-run": {},  # the run's own decoding (pyproject's: greedy, 3-grams blocked)
    "erp1.3": {"encoder_repetition_penalty": 1.3},
    "erp1.6": {"encoder_repetition_penalty": 1.6},
    "erp2.0": {"encoder_repetition_penalty": 2.0},
    "beam4": {"num_beams": 4},
    "beam4-erp1.3": {"num_beams": 4, "encoder_repetition_penalty": 1.3},
    "beam4-erp1.6": {"num_beams": 4, "encoder_repetition_penalty": 1.6},
}


def decoded_figures(run_dir: Path, settings: list[str]) -> dict[str, dict[str, float]]:
    """ROUGE-L (validation, held-out, held-out per aspect) of ``run_dir``'s final model per setting."""
    config = RunConfig.from_saved(json.loads((run_dir / "config.json").read_text()))
    corpus = load_corpus(config)
    users = config.min_available_nodes
    validation = [e for u in range(users) for e in user_partition(corpus, u, users, config).validation]
    heldout = list(heldout_examples(corpus, config))
    model = load_pretrained(run_dir / "model")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(run_dir / "model")
    figures = {}
    for name in settings:
        decoding = replace(DecodingConfig.from_run_config(config), **SETTINGS[name])

        def decode(examples, decoding=decoding):
            return generate_summaries(
                model, tokenizer, [e.source for e in examples], decoding, config.max_source_tokens
            )

        on_heldout = decode(heldout)
        figures[name] = {
            "val-rougeL": rouge(decode(validation), [e.summary for e in validation])["rougeL"],
            "heldout-rougeL": rouge(on_heldout, [e.summary for e in heldout])["rougeL"],
            "heldout-words": sum(len(s.split()) for s in on_heldout) / len(on_heldout),
            **by_aspect(heldout, on_heldout),
        }
        print(
            f"{run_dir.name} {name:14s} val {figures[name]['val-rougeL']:6.2f} "
            f"held-out {figures[name]['heldout-rougeL']:6.2f}",
            flush=True,
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tag", help="a bench/default_quality.py tag (its runs' final models)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--results-dir", default="results/default-quality")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = sorted((PROJECT_DIR / args.results_dir / args.tag).glob("seed-*"))
    if not runs:
        raise SystemExit(f"no runs of tag {args.tag!r}: run bench/default_quality.py --tag {args.tag} first")
    per_seed = {run.name: decoded_figures(run, args.settings) for run in runs}
    write_result(
        f"decoding-{args.tag}", {"settings": {k: SETTINGS[k] for k in args.settings}, "seeds": per_seed}
    )


if __name__ == "__main__":
    main()
