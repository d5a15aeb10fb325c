"""Can a reward model learn a user's taste from a few dozen judgements? An offline probe.

    python bench/reward_model_probe.py results/quality/ppo_none_none+personal@32/seed-0

Reads a finished run with learned reward models (issue 13): each user's judgements, as the
user kept them (``users/user-<k>/reward-model.safetensors``), and the run's final summarizer
(whose encoder every model here starts from; the product's starts from the summarizer of the
user's first feedback round and keeps it, nudged). Splits each user's judgements by document:
the first ``--train-share`` of the documents (ratings' documents first, then choices', each
in the order given) to learn from, the rest held out (no document on both sides). Then fits, on the
same judgements and losses as the product (:func:`flhf_core.learning.reward_model.fit`'s Bradley-Terry
and rating losses), reward models that differ in how much they may learn and whose
judgements they learn from:

* ``encoder+head``: the product's model and fit (the summarizer's encoder, copied, and the
  length-aware head; the encoder and content weights at ``--learning-rate``, the length profile
  and offset at ``--length-learning-rate``, ``--steps`` minibatch steps);
* ``first model``: the model before its head saw length (a head on the pooled states alone,
  every parameter at 1e-3), fitted alike: the before-and-after on the same judgements;
* ``head``: the head alone on the frozen encoder (d_model + 11 parameters, full batch; its
  content weights at the slow rate, so mostly a length model);
* ``head, all users``: that head fitted on every user's training judgements (what perfect
  sharing could give a user: a federated model can do no better than pooling), and
  ``head, same aspect``: on the judgements of the users who want the same aspect (others'
  judgements of the user's held-out documents left out);
* ``states only``: the pooled states alone, at the fast rate (what they tell on their own);
* ``length``: a one-parameter rule, "closer to L words is better", L fitted on the training pairs;
* ``true utility``: the simulated user's own utility (what nothing here can see): its agreement
  with the user's held-out pairs is the ceiling the user's noise leaves.

Each is scored on the held-out documents two ways: ``agreement`` with the pairs the user judged
(noisy, what the product's gate sees), and ``accuracy`` against the user's true utility on the
same summaries (noise-free; :func:`flhf_core.learning.reward_model.pairwise_accuracy`). Chance is 0.5.

Writes ``bench/results/reward-model-probe.json`` and ``.png``. Runs alone in a few minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from common import RESULTS_DIR, write_result
from probe_fits import (
    Features,
    Scorer,
    agreement_of,
    fit_encoder_and_head,
    fit_head,
    fit_length,
    merged,
    split_by_document,
    summaries_of,
)
from safetensors import safe_open
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from flhf_core.client.reward_state import STATE_FILE, judgements_from_mapping
from flhf_core.config import RunConfig
from flhf_core.data import partitions
from flhf_core.data.corpus import load_corpus
from flhf_core.learning import reward_model as rm
from flhf_core.users.feedback import build_profile, judge


def probe(run_dir: Path, train_share: float, steps: int, head_steps: int, rates: tuple[float, float]) -> dict:
    config = RunConfig.from_saved(json.loads((run_dir / "config.json").read_text()))
    corpus = load_corpus(config)
    by_text = {doc.text: doc for doc in corpus.documents}
    summarizer = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    max_tokens = config.max_source_tokens

    users = {}
    for path in sorted((run_dir / "users").glob(f"user-*/{STATE_FILE}")):
        with safe_open(str(path), framework="numpy") as handle:
            judgements = judgements_from_mapping(json.loads(handle.metadata()["judgements"]))
        user = int(path.parent.name.removeprefix("user-"))
        users[user] = (build_profile(user, config.user_profiles, config.aspects, config.seed), judgements)
    if not users:
        raise SystemExit(f"{run_dir}: no users/user-*/{STATE_FILE} (was it run with a learned reward model?)")
    split = {u: split_by_document(j, train_share) for u, (_, j) in users.items()}
    features = Features(summarizer, tokenizer, max_tokens)

    rows = []
    for user, (profile, _) in users.items():
        train, test = split[user]

        def utility(documents, summaries, profile=profile):
            return np.array(
                [
                    judge(profile, s, partitions.preferred_summary(by_text[d], profile, config)).utility
                    for d, s in zip(documents, summaries, strict=True)
                ]
            )

        same_aspect = [split[u][0] for u, (p, _) in users.items() if p.aspect == profile.aspect]
        length_rule, length = fit_length(train)
        scorers: dict[str, Scorer] = {
            "encoder+head": fit_encoder_and_head(
                copy.deepcopy(summarizer), tokenizer, train, steps, rates, max_tokens
            ),
            "first model": fit_encoder_and_head(
                copy.deepcopy(summarizer), tokenizer, train, steps, (1e-3, 1e-3), max_tokens, blind=True
            ),
            "head": fit_head(features, train, head_steps, rates),
            "head, same aspect": fit_head(features, merged(same_aspect, test), head_steps, rates),
            "head, all users": fit_head(
                features, merged([s[0] for s in split.values()], test), head_steps, rates
            ),
            # the pooled states alone, at the fast rate: what they can tell when given a free hand
            "states only": fit_head(features, train, head_steps, (rates[1], rates[1]), see_length=False),
            "length": length_rule,
            "true utility": utility,
        }
        held_out = summaries_of(test)
        documents, summaries = [d for d, _ in held_out], [s for _, s in held_out]
        true = utility(documents, summaries)
        row = {
            "user": user,
            "aspect": profile.aspect,
            "length-words": profile.length_words,
            "train-judgements": len(train),
            "test-judgements": len(test),
            "test-pairs": len(test.pairs()),
            "fitted-length": length,
        }
        for name, scorer in scorers.items():
            row[f"{name} agreement"] = agreement_of(scorer, test.pairs())
            row[f"{name} train-agreement"] = agreement_of(scorer, train.pairs())
            row[f"{name} accuracy"] = rm.pairwise_accuracy(
                scorer(documents, summaries).tolist(), true.tolist(), documents
            )
        rows.append(row)
        print(
            f"user {user}: "
            + ", ".join(f"{n} {row[f'{n} agreement']:.2f}/{row[f'{n} accuracy']:.2f}" for n in scorers),
            flush=True,
        )
    names = list(scorers)
    means = {
        f"{n} {kind}": float(np.nanmean([r[f"{n} {kind}"] for r in rows]))
        for n in names
        for kind in ("agreement", "train-agreement", "accuracy")
    }
    return {
        "run": str(run_dir),
        "train-share": train_share,
        "learning-rates": rates,
        "encoder-steps": steps,
        "head-steps": head_steps,
        "models": names,
        "users": rows,
        "means": means,
    }


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = figures["models"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 4))
    for offset, kind in ((-0.2, "agreement"), (0.2, "accuracy")):
        values = [figures["means"][f"{n} {kind}"] for n in names]
        ax.bar(x + offset, values, width=0.4, label=f"held-out {kind}")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(0.3, 1.0)
    ax.set_ylabel("pairs ordered as the user")
    ax.set_title("Reward models from a user's judgements, held-out documents (mean over users)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run with a learned reward model")
    parser.add_argument("--train-share", type=float, default=2 / 3, help="share of documents to learn from")
    parser.add_argument(
        "--steps", type=int, default=120, help="encoder+head steps (a 32-budget run's 3 rounds take 120)"
    )
    parser.add_argument(
        "--head-steps", type=int, default=120, help="full-batch steps of the head-only models"
    )
    defaults = RunConfig()  # the product's rates today, not those the run was made with
    parser.add_argument("--learning-rate", type=float, default=defaults.reward_model_learning_rate)
    parser.add_argument(
        "--length-learning-rate", type=float, default=defaults.reward_model_length_learning_rate
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rates = (args.learning_rate, args.length_learning_rate)
    figures = probe(args.run_dir, args.train_share, args.steps, args.head_steps, rates)
    for name in figures["models"]:
        m = figures["means"]
        print(
            f"{name:>18}: held-out agreement {m[f'{name} agreement']:.3f}, accuracy {m[f'{name} accuracy']:.3f}, "
            f"train agreement {m[f'{name} train-agreement']:.3f}"
        )
    write_result("reward-model-probe", figures)
    plot(figures, RESULTS_DIR / "reward-model-probe.png")


if __name__ == "__main__":
    main()
