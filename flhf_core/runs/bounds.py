"""What personalization could gain: bounds from one finished run's global model.

Under ``partitioning = codes`` (the ``personalize`` preset) the shared model writes any control
code on request, so a run's global model (typically the supervised phase every feedback row
of a seed starts from, ``init-from``) bounds what feedback can teach it. Each method serves
each user a summary of each of the user's held-out report documents, judged by the user's
true utility (:func:`~flhf_core.users.feedback.judge`, against its preferred code's target):

* ``fedavg-sft``: the neutral request (``summarize``), what every user gets unpersonalized;
* ``best-shared-code``: the one code for everyone that serves the users best on their
  reward documents (chosen there, reported on held-out ones);
* ``oracle``: each user asks with the code that expresses what it wants (the upper bound
  for preferences a code can express);
* ``first-L-words``: the document's first L words, L the user's preferred length;
* ``lead-<k>``: the abstract's first k sentences.

    flhf bounds RUN_DIR        # writes RUN_DIR/bounds.json

``bounds.json``: per method, each user's mean ``reward`` and its ``content``, ``length`` and
``keywords`` factors, the code ``best-shared-code`` chose, both codes' means on the reward documents
(``best-shared-code-reward-documents``, ``oracle-reward-documents``: what a supervised recipe
may be chosen on, never the held-out figures), and ``code-steering``: per code, how
long the model's summaries are against the code's length, and how close to the code's own
target against the other codes' (a model whose codes do not steer bounds nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from flhf_core.common import ConfigError, atomic_write_json, read_json
from flhf_core.config import RunConfig
from flhf_core.data import codes, partitions
from flhf_core.data.corpus import Corpus, Document, load_corpus, sentences_of
from flhf_core.users.feedback import UserProfile, build_profile, judge

LEAD_SENTENCES = (1, 2)
FACTORS = ("reward", "content", "length", "keywords")
Request = tuple[str, str]  # (document id, instruction)
Writer = Callable[[Sequence[tuple[Document, str]]], list[str]]  # (document, instruction)s -> summaries


def user_figures(
    profile: UserProfile, config: RunConfig, docs: Sequence[Document], summary: Callable[[Document], str]
) -> dict[str, float]:
    """``profile``'s mean utility and its factors over ``docs``, each summarized by ``summary``."""
    judged = [judge(profile, summary(d), partitions.preferred_summary(d, profile, config)) for d in docs]
    return {
        "reward": float(np.mean([j.utility for j in judged])),
        "content": float(np.mean([j.content for j in judged])),
        "length": float(np.mean([j.length for j in judged])),
        "keywords": float(np.mean([j.keywords for j in judged])),
    }


def bounds(config: RunConfig, corpus: Corpus, num_users: int, write: Writer) -> dict:
    """Every method's figures per user (see the module docstring); ``write`` is the model."""
    if config.partitioning != "codes":
        raise ConfigError(
            f"bounds need partitioning='codes' (control codes to ask for); the run has {config.partitioning!r}."
        )
    every = codes.all_codes(corpus.aspects)
    profiles = [build_profile(u, config.user_profiles, corpus.aspects, config.seed) for u in range(num_users)]
    by_id = corpus.by_id

    def docs(examples) -> list[Document]:
        return [by_id[e.doc_id] for e in examples]

    report = {p.user_id: docs(partitions.report_examples(corpus, config, p)) for p in profiles}
    reward_ids = {p.user_id: partitions.reward_doc_ids(corpus, p.user_id, config) for p in profiles}
    reward = {
        p.user_id: docs(partitions.judged_examples(corpus, reward_ids[p.user_id], p, config))
        for p in profiles
    }
    instructions = (partitions.NEUTRAL_INSTRUCTION, *(code.prompt for code in every))
    wanted = {(d.doc_id, i) for ds in (*report.values(), *reward.values()) for d in ds for i in instructions}
    requests = sorted(wanted)
    written = dict(zip(requests, write([(by_id[d], i) for d, i in requests]), strict=True))

    def asked(instruction: str) -> Callable[[Document], str]:
        return lambda d: written[(d.doc_id, instruction)]

    # each user's reward on its reward documents, per code: what the shared code is chosen on,
    # and, with the oracle's, what a supervised recipe may be chosen on
    reward_by_code = {
        code: {
            p.user_id: user_figures(p, config, reward[p.user_id], asked(code.prompt))["reward"]
            for p in profiles
        }
        for code in every
    }
    on_reward = {code: float(np.mean(list(users.values()))) for code, users in reward_by_code.items()}
    shared = max(every, key=lambda code: on_reward[code])
    oracle_on_reward = np.mean([reward_by_code[codes.preferred_code(p)][p.user_id] for p in profiles])

    def per_user(summary: Callable[[Document, UserProfile], str]) -> dict[str, dict[str, float]]:
        return {
            str(p.user_id): user_figures(p, config, report[p.user_id], lambda d, p=p: summary(d, p))
            for p in profiles
        }

    methods = {
        "fedavg-sft": per_user(lambda d, p: written[(d.doc_id, partitions.NEUTRAL_INSTRUCTION)]),
        "best-shared-code": per_user(lambda d, p: written[(d.doc_id, shared.prompt)]),
        "oracle": per_user(lambda d, p: written[(d.doc_id, codes.preferred_code(p).prompt)]),
        "first-L-words": per_user(lambda d, p: " ".join(d.text.split()[: p.length_words])),
        **{
            f"lead-{k}": per_user(lambda d, p, k=k: " ".join(sentences_of(d.abstract)[:k]))
            for k in LEAD_SENTENCES
        },
    }
    held_out = list({d.doc_id: d for ds in report.values() for d in ds}.values())
    return {
        "best-shared-code": shared.name,
        "best-shared-code-reward-documents": on_reward[shared],
        "oracle-reward-documents": float(oracle_on_reward),
        "code-steering": code_steering(every, held_out, written),
        "methods": methods,
        "mean": {m: float(np.mean([u["reward"] for u in users.values()])) for m, users in methods.items()},
        "worst": {m: float(np.min([u["reward"] for u in users.values()])) for m, users in methods.items()},
    }


def code_steering(
    every: Sequence[codes.Code], docs: Sequence[Document], written: dict[Request, str]
) -> dict[str, dict[str, float]]:
    """Whether the model does what each code asks, on the held-out documents: its summaries'
    mean length against the code's, and their ROUGE-L against the code's own target and
    against the other codes' targets (a code that steers content scores higher on its own)."""
    from flhf_core.users.rouge import rouge_pair

    steering = {}
    for code in every:
        own, others, words = [], [], []
        for doc in docs:
            targets = {c.prompt: codes.target(doc, c) for c in every}
            if not targets[code.prompt]:
                continue
            summary = written[(doc.doc_id, code.prompt)]
            words.append(len(summary.split()))
            own.append(rouge_pair(summary, targets[code.prompt])["rougeL"])
            others.append(
                np.mean(
                    [rouge_pair(summary, t)["rougeL"] for p, t in targets.items() if t and p != code.prompt]
                )
            )
        if words:
            steering[code.name] = {
                "words": float(np.mean(words)),
                "code-words": float(code.words),
                "rougeL-own-target": float(np.mean(own)),
                "rougeL-other-targets": float(np.mean(others)),
            }
    return steering


def model_writer(run_dir: Path, config: RunConfig) -> Writer:
    """The run's global model (``model/``) as a writer, decoding as the run does."""
    from transformers import AutoTokenizer

    from flhf_core.learning.generate import summarize
    from flhf_core.learning.model import load_pretrained

    folder = run_dir / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{run_dir} holds no global model (model/): not a finished run.")
    model = load_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def write(requests: Sequence[tuple[Document, str]]) -> list[str]:
        sources = [partitions.request(doc, instruction, config) for doc, instruction in requests]
        return summarize(model, tokenizer, sources, config)

    return write


def write_bounds(run_dir: Path) -> Path:
    """``flhf bounds RUN_DIR``: the bounds of the run's global model, written to ``bounds.json``."""
    run_dir = run_dir.expanduser().resolve()
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not an FLHF run (no config.json).")
    config = RunConfig.from_saved(read_json(run_dir / "config.json"))
    num_users = len(read_json(run_dir / "splits.json")["users"])
    result = bounds(config, load_corpus(config), num_users, model_writer(run_dir, config))
    path = run_dir / "bounds.json"
    atomic_write_json(path, {"run": run_dir.name, "users": num_users, **result})
    return path
