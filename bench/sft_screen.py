"""Screen the personalize preset's supervised phase: does it teach the control codes, and how fast?

    python bench/sft_screen.py --tag preset                          # the preset's supervised phase
    python bench/sft_screen.py --tag everyone num-server-rounds=10 sft-fraction-train=1.0
    python bench/sft_screen.py --tag central --central num-server-rounds=5 lr-schedule='"constant"'

A FedAvg of the supervised rounds in one process, the same work as ``flhf run personalize``'s
supervised phase (each sampled user: ``local-epochs`` of SFT on its own examples, from the
global model; the new global model: the average weighted by examples; the round's learning
rate from ``lr-schedule``; ``sft-fraction-train`` users sampled per round) without Flower's
processes, so a lever costs one run's compute and the model is judged every ``--every``
rounds. ``--central``: one learner on every user's examples (what federation could reach).

Judged on the users' *validation* documents (never held-out ones, so a lever may be chosen
here): the code-steering table of ``flhf bounds`` (:func:`flhf_core.runs.bounds.code_steering`),
summarized as the mean words written per length code and ROUGE-L to each code's own target
against the other codes'. Writes ``bench/results/sft-screen/<tag>.json`` after each judgement.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import numpy as np
import torch
from common import RESULTS_DIR, machine

from flhf_core.common import atomic_write_json
from flhf_core.config import RunConfig, load_preset
from flhf_core.data import codes, partitions
from flhf_core.data.corpus import load_corpus
from flhf_core.learning.algorithms.sft import SFTConfig, train_sft
from flhf_core.learning.batches import encode
from flhf_core.learning.generate import summarize
from flhf_core.learning.model import build_model, shipped_tokenizer
from flhf_core.runs.bounds import code_steering
from flhf_core.runs.presets import parse_override, resolve_preset
from flhf_core.server.state import round_learning_rate

USERS = 24  # the preset's users
JUDGED_DOCUMENTS = 24  # validation documents, every code of each


def steering_summary(config: RunConfig, model, tokenizer, corpus, docs) -> dict:
    every = codes.all_codes(corpus.aspects)
    requests = [(doc, code.prompt) for doc in docs for code in every]
    sources = [partitions.request(doc, prompt, config) for doc, prompt in requests]
    summaries = summarize(model, tokenizer, sources, config)
    written = dict(zip([(d.doc_id, p) for d, p in requests], summaries, strict=True))
    table = code_steering(every, docs, written)
    length_of = {code.name: code.length for code in every}
    words = {
        length: float(np.mean([row["words"] for name, row in table.items() if length_of[name] == length]))
        for length in codes.LENGTH_WORDS
    }
    own = float(np.mean([row["rougeL-own-target"] for row in table.values()]))
    others = float(np.mean([row["rougeL-other-targets"] for row in table.values()]))
    return {"words": words, "rougeL-own-target": own, "own-minus-other": own - others, "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("settings", nargs="*", help="KEY=VALUE overrides of the preset")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--every", type=int, default=10, help="judge the model every this many rounds")
    parser.add_argument("--central", action="store_true", help="one learner on every user's examples")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = dict(parse_override(setting) for setting in args.settings)
    preset = load_preset(resolve_preset("personalize"))
    phase = {"feedback-algorithm": "sft", "personalization": "none", "seed": 0}
    config = RunConfig.from_mapping(
        {**preset, **phase, "num-server-rounds": preset["sft-rounds"], **overrides}
    )
    corpus, tokenizer = load_corpus(config), shipped_tokenizer()
    model = build_model(config, tokenizer)
    users = [partitions.user_partition(corpus, user, USERS, config) for user in range(USERS)]
    if args.central:
        pooled = tuple(e for u in users for e in u.train)
        users = [replace(users[0], train=pooled)]
    encoded = [encode(tokenizer, u.train, config.max_source_tokens, config.max_target_tokens) for u in users]
    validation = {e.doc_id: corpus.by_id[e.doc_id] for u in users for e in u.validation}
    docs = list(validation.values())[:JUDGED_DOCUMENTS]
    fraction = 1.0 if args.central else config.round_fraction_train("sft")
    result = {
        "tag": args.tag,
        "settings": overrides,
        "central": args.central,
        "machine": machine(),
        "rounds": [],
    }
    path = RESULTS_DIR / "sft-screen" / f"{args.tag}.json"
    started = time.perf_counter()
    for server_round in range(1, config.num_server_rounds + 1):
        rate = round_learning_rate(config, server_round)
        rng = np.random.default_rng([config.seed, server_round])
        sampled = sorted(rng.choice(len(users), max(1, math.floor(len(users) * fraction)), replace=False))
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in start.items()}
        weight, losses = 0, []
        for i in map(int, sampled):
            model.load_state_dict(start)
            sft = SFTConfig.from_run_config(config, rate, seed=1000 * server_round + i)
            losses.append(train_sft(model, tokenizer, users[i].train, sft, encoded=encoded[i]).last_loss)
            weight += len(users[i].train)
            for k, v in model.state_dict().items():
                total[k] += len(users[i].train) * v.float()
        model.load_state_dict({k: (total[k] / weight).to(start[k].dtype) for k in start})
        row = {
            "round": server_round,
            "learning-rate": rate,
            "users": len(sampled),
            "train-loss": np.mean(losses),
        }
        line = f"round {server_round}/{config.num_server_rounds} loss {row['train-loss']:.3f}"
        if server_round % args.every == 0 or server_round == config.num_server_rounds:
            judged = steering_summary(config, model, tokenizer, corpus, docs)
            row |= judged
            words = "/".join(f"{w:.1f}" for w in judged["words"].values())
            line += f" words short/medium/long {words} own-minus-other {judged['own-minus-other']:+.3f}"
        row["seconds"] = time.perf_counter() - started
        result["rounds"].append(row)
        atomic_write_json(path, result)
        print(f"[{args.tag}] {line} ({row['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
