"""Who holds which document, in which role, and what the model is told.

From the corpus (:mod:`flhf_core.data.corpus`) everything else is derived deterministically
by ``seed``:

* the server's held-out documents, so no user ever trains on them: under
  ``heldout-split = official`` the dataset's own test split (aclsum's 100 test papers),
  otherwise ``heldout-fraction`` of them by a hash of the document id;
* one user's examples out of ``num-partitions``: ``iid`` (every (document,
  aspect) pair goes to a uniformly chosen user), ``dirichlet`` (per aspect, the
  users' shares follow Dir(alpha), so users see skewed aspect mixes) or
  ``preference`` (documents are dealt out and each user keeps the summaries
  of its preferred aspect, ``aspects[user % len(aspects)]``) or ``codes`` (documents are
  dealt out and each user trains on every control code's target of its documents, and on
  the neutral request; :mod:`flhf_core.data.codes`);
* each document's role: held out by the server, a reward document (judged, never
  trained on), a validation document, or a training document (:func:`document_role`).

Who holds what follows from hashes of (seed, document, aspect) alone, the same in every
process. One pass over the corpus assigns every example (:func:`assignment`, cached per
process), after which any user's partition is a lookup: a worker serving many of 1000 users
scans the corpus once, not once per user.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flhf_core.config import ConfigError, RunConfig
from flhf_core.data import codes
from flhf_core.data.corpus import Corpus, Document, Example, load_corpus, sentences_of
from flhf_core.data.extractor import train_split_extractor
from flhf_core.users.profiles import UserProfile, build_profile

NEUTRAL_INSTRUCTION = "summarize"
# ``aspect-prompt = question``: each aspect asked for in words (an aspect not named here keeps
# its name). One token of difference between prompts is a weak signal for a model trained from
# scratch: the default's model writes the approach template for most challenge prompts.
ASPECT_QUESTIONS = {
    "challenge": "what problem or challenge does this paper address",
    "approach": "what method or approach does this paper propose",
    "outcome": "what results or findings does this paper report",
}


# --------------------------------------------------------------------------
# Deterministic assignment
# --------------------------------------------------------------------------
def unit_hash(*parts: object) -> float:
    """A stable pseudo-random number in [0, 1) from its arguments (same in every process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# Every document has exactly one role, decided by hashes of (seed, document id) alone, so
# that the four kinds of documents can never mix, whatever the partitioning:
HELDOUT, REWARD, VALIDATION, TRAIN = "heldout", "reward", "validation", "train"


def is_heldout(doc: Document, config: RunConfig) -> bool:
    """Whether the server holds ``doc`` out: its official split says test (``heldout-split =
    official`` and a dataset with a test split), else a hash of its id under ``heldout-fraction``."""
    if config.heldout_split == "official" and doc.split:
        return doc.split == "test"
    return unit_hash(config.seed, "heldout", doc.doc_id) < config.heldout_fraction


def heldout_by(corpus: Corpus, config: RunConfig) -> str:
    """How this run's held-out documents are chosen: ``official`` (the dataset's test split) or
    ``hash`` (``heldout-fraction`` of the documents; a dataset without a test split)."""
    official = config.heldout_split == "official" and any(d.split for d in corpus.documents)
    return "official" if official else "hash"


def document_role(doc: Document, config: RunConfig) -> str:
    """Which kind of document ``doc`` is.

    * ``heldout``: the server's, for reporting only (:func:`is_heldout`);
    * ``reward``: fresh documents users judge the model on, to steer aggregation; nobody
      trains or gives feedback on them (``reward-fraction`` of the rest);
    * ``validation``: users' validation documents, nobody trains on them (``val-fraction``
      of the rest), so a user's validation and training documents never share a document;
    * ``train``: dealt to users by the partitioning; users train and give feedback on them.
    """
    if is_heldout(doc, config):
        return HELDOUT
    if unit_hash(config.seed, "reward", doc.doc_id) < config.reward_fraction:
        return REWARD
    if unit_hash(config.seed, "val", doc.doc_id) < config.val_fraction:
        return VALIDATION
    return TRAIN


@functools.lru_cache(maxsize=1024)
def preferred_aspect(user: int, config: RunConfig, aspects: tuple[str, ...]) -> str:
    """The aspect user ``user`` prefers: its profile's (``user-profiles``), so that under
    ``preference`` partitioning a user trains on the aspect it judges by."""
    return build_profile(user, config.user_profiles, aspects, config.seed).aspect


@functools.lru_cache(maxsize=64)
def dirichlet_shares(seed: int, aspect: str, num_users: int, alpha: float) -> np.ndarray:
    """Cumulative user shares of one aspect's examples, drawn from Dir(alpha)."""
    rng = np.random.default_rng([seed, int(unit_hash("dirichlet", aspect) * 2**32)])
    return np.cumsum(rng.dirichlet(np.full(num_users, alpha)))


def owner(doc_id: str, aspect: str, num_users: int, config: RunConfig, aspects: Sequence[str]) -> int | None:
    """Which user holds the (document, aspect) example, or None if nobody does."""
    seed = config.seed
    if config.partitioning == "iid":
        return int(unit_hash(seed, "iid", doc_id, aspect) * num_users)
    if config.partitioning == "dirichlet":
        shares = dirichlet_shares(seed, aspect, num_users, config.dirichlet_alpha)
        u = unit_hash(seed, "dirichlet", doc_id, aspect) * shares[-1]
        return min(int(np.searchsorted(shares, u, side="right")), num_users - 1)
    if config.partitioning == "codes":  # each document goes to one user, every code of it
        return int(unit_hash(seed, "codes", doc_id) * num_users)
    # preference: each document goes to one user, who keeps its preferred aspect
    user = int(unit_hash(seed, "preference", doc_id) * num_users)
    return user if preferred_aspect(user, config, tuple(aspects)) == aspect else None


@dataclass(frozen=True)
class UserData:
    user: int
    train: tuple[Example, ...]  # (document, aspect) examples the user trains on
    validation: tuple[Example, ...]  # the user's examples on validation documents
    reward_doc_ids: tuple[str, ...]  # fresh documents the user judges the model on

    @property
    def feedback_doc_ids(self) -> tuple[str, ...]:
        """The documents the user gives feedback on: its training documents."""
        return tuple(dict.fromkeys(e.doc_id for e in self.train))


@dataclass(frozen=True)
class Assignment:
    """Every example's holder, from one pass over the corpus (indices into ``corpus.documents``)."""

    train: dict[int, list[tuple[int, str]]]  # user -> (document index, aspect) it trains on
    validation: dict[int, list[tuple[int, str]]]  # user -> its validation examples
    reward_pool: tuple[str, ...]  # the reward documents, in corpus order


_assignments: dict[tuple, tuple[Corpus, Assignment]] = {}


def assignment(corpus: Corpus, num_users: int, config: RunConfig) -> Assignment:
    """Who holds which example among ``num_users`` users (cached per process and corpus)."""
    key = (
        id(corpus),
        num_users,
        config.seed,
        config.partitioning,
        config.user_profiles,  # preference partitioning follows each user's profile
        config.dirichlet_alpha,
        config.heldout_split,
        config.heldout_fraction,
        config.reward_fraction,
        config.val_fraction,
    )
    cached = _assignments.get(key)
    if cached is not None and cached[0] is corpus:
        return cached[1]
    train: dict[int, list[tuple[int, str]]] = {}
    validation: dict[int, list[tuple[int, str]]] = {}
    pool = []
    for index, doc in enumerate(corpus.documents):
        role = document_role(doc, config)
        if role == REWARD:
            pool.append(doc.doc_id)
        if role not in (TRAIN, VALIDATION):
            continue
        holders = validation if role == VALIDATION else train
        for aspect, summary in doc.summaries:
            user = owner(doc.doc_id, aspect, num_users, config, corpus.aspects) if summary else None
            if user is not None:
                holders.setdefault(user, []).append((index, aspect))
    if len(_assignments) >= 8:
        _assignments.clear()
    result = Assignment(train, validation, tuple(pool))
    _assignments[key] = (corpus, result)
    return result


def user_partition(corpus: Corpus, user: int, num_users: int, config: RunConfig) -> UserData:
    """User ``user``'s train and validation examples and reward documents (never held-out ones)."""
    if not 0 <= user < num_users:
        raise ConfigError(f"partition-id {user} is outside [0, num-partitions={num_users}).")
    held = assignment(corpus, num_users, config)

    def examples(pairs: list[tuple[int, str]]) -> tuple[Example, ...]:
        docs = corpus.documents
        if config.partitioning == "codes":
            indices = dict.fromkeys(i for i, _ in pairs)
            return tuple(e for i in indices for e in code_examples(docs[i], corpus.aspects, config))
        return tuple(
            Example(
                docs[i].doc_id,
                aspect,
                reading(docs[i], aspect, config),
                docs[i].summary(aspect),
                instruction_for(config, aspect),
            )
            for i, aspect in pairs
        )

    train = examples(held.train.get(user, []))
    if config.highlight_supervision:
        train += highlight_examples(corpus, held.train.get(user, []), config)
    return UserData(
        user,
        train,
        examples(held.validation.get(user, [])),
        reward_doc_ids(corpus, user, config, held.reward_pool),
    )


def highlight_examples(
    corpus: Corpus, pairs: list[tuple[int, str]], config: RunConfig
) -> tuple[Example, ...]:
    """Extra supervision (``highlight-supervision``): for each training (document, aspect), the
    document's sentences annotators highlighted for that aspect as a second, extractive target
    under the same prompt. A from-scratch model has too few summaries to learn much content
    (issue 12); copying the marked sentences is what the best extractive baselines do, and it
    teaches the model where each aspect lives in a document."""
    docs = corpus.documents
    return tuple(
        Example(
            docs[i].doc_id,
            aspect,
            reading(docs[i], aspect, config),
            docs[i].highlight(aspect),
            instruction_for(config, aspect),
        )
        for i, aspect in pairs
        if docs[i].highlight(aspect)
    )


def code_examples(doc: Document, aspects: Sequence[str], config: RunConfig) -> tuple[Example, ...]:
    """``doc``'s examples under ``partitioning = codes``: every control code's target under
    its prompt, then the neutral request trained on the target of one code drawn uniformly
    for this document (seeded): the average reader, who names no code."""
    every = codes.all_codes(tuple(aspects))
    text = reading(doc, "", config)
    examples = [
        Example(doc.doc_id, code.content, text, codes.target(doc, code), code.prompt) for code in every
    ]
    drawn = every[int(unit_hash(config.seed, "neutral-code", doc.doc_id) * len(every))]
    examples.append(Example(doc.doc_id, drawn.content, text, codes.target(doc, drawn), NEUTRAL_INSTRUCTION))
    return tuple(e for e in examples if e.summary)


def reward_doc_ids(
    corpus: Corpus, user: int, config: RunConfig, pool: Sequence[str] | None = None
) -> tuple[str, ...]:
    """``reward-documents`` of the reward documents, drawn for this user (seeded, in corpus order).

    Each user draws its own; two users may draw the same document, as two people may read
    the same paper. No user ever trains or gives feedback on any of them. ``pool``: the
    reward documents, if the caller has them.
    """
    if pool is None:
        pool = [d.doc_id for d in corpus.documents if document_role(d, config) == REWARD]
    drawn = sorted(pool, key=lambda doc_id: unit_hash(config.seed, "reward-draw", user, doc_id))
    chosen = set(drawn[: config.reward_documents])
    return tuple(doc_id for doc_id in pool if doc_id in chosen)


def splits(corpus: Corpus, config: RunConfig, num_users: int, exclude: Collection[int] = ()) -> dict:
    """Which documents serve what, for ``splits.json``: anyone can check they never mix.

    Users in ``exclude`` hold their own data file, which the server never sees: they are
    listed as ``{"own-data": true}``.
    """

    def ids(examples: Sequence[Example]) -> list[str]:
        return list(dict.fromkeys(e.doc_id for e in examples))

    users: dict[str, dict] = {}
    for user in range(num_users):
        if user in exclude:
            users[str(user)] = {"own-data": True}
            continue
        part = user_partition(corpus, user, num_users, config)
        users[str(user)] = {
            "train": ids(part.train),
            "validation": ids(part.validation),
            "feedback": list(part.feedback_doc_ids),
            "reward": list(part.reward_doc_ids),
        }
    return {
        "heldout-by": heldout_by(corpus, config),
        "heldout": heldout_doc_ids(corpus, config),
        "users": users,
    }


def heldout_doc_ids(corpus: Corpus, config: RunConfig) -> list[str]:
    """The documents no user trains on, in corpus order."""
    return list(_heldout_ids(corpus, config))


@functools.lru_cache(maxsize=8)
def _heldout_ids(corpus: Corpus, config: RunConfig) -> tuple[str, ...]:
    return tuple(d.doc_id for d in corpus.documents if is_heldout(d, config))


def heldout_examples(corpus: Corpus, config: RunConfig) -> tuple[Example, ...]:
    """The server's held-out (document, aspect) examples, capped at ``heldout-max-examples``;
    under ``partitioning = codes``, (document, control code) examples."""
    if config.partitioning == "codes":
        examples = [
            e
            for doc in corpus.documents
            if is_heldout(doc, config)
            for e in code_examples(doc, corpus.aspects, config)
        ]
    else:
        examples = [
            Example(
                doc.doc_id, aspect, reading(doc, aspect, config), summary, instruction_for(config, aspect)
            )
            for doc in corpus.documents
            if is_heldout(doc, config)
            for aspect, summary in doc.summaries
            if summary
        ]
    if config.heldout_max_examples and len(examples) > config.heldout_max_examples:
        # under codes one document has several examples per aspect: their instructions tell them apart
        extra = (lambda e: (e.instruction,)) if config.partitioning == "codes" else (lambda e: ())
        examples.sort(key=lambda e: unit_hash(config.seed, "heldout-order", e.doc_id, e.aspect, *extra(e)))
        examples = examples[: config.heldout_max_examples]
    return tuple(examples)


def reading(doc: Document, aspect: str, config: RunConfig) -> str:
    """What the model reads of ``doc`` when asked for ``aspect``: the whole text, or where the
    run extracts (``extractor``) the sentences the extractor picks for the aspect
    (:mod:`flhf_core.data.extractor`). A document without aclsum's sentence boundaries (a
    user's data file) is split at sentence ends; an aspect the extractor does not know reads
    the whole text."""
    if not config.extracts:
        return doc.text
    extractor = train_split_extractor(load_corpus(config))
    if aspect not in extractor.full.weights:
        return doc.text
    if not doc.sentences:
        doc = dataclasses.replace(doc, sentences=tuple(sentences_of(doc.text)))
    return extractor.extract(doc, aspect, config.extract_sentences)


def request(doc: Document, instruction: str, config: RunConfig) -> str:
    """The model input that asks for ``instruction`` (a code's prompt, or the neutral request)
    of ``doc``, read whole or as extracted, as the run asks for codes."""
    return Example(doc.doc_id, "", reading(doc, "", config), "", instruction).source


def instruction_for(config: RunConfig, aspect: str) -> str:
    """What the model is told to write for ``aspect`` ("" = the aspect's name). Under
    ``preference`` partitioning users never name their aspect: the prompt is neutral."""
    if config.partitioning == "preference":
        return NEUTRAL_INSTRUCTION
    return ASPECT_QUESTIONS.get(aspect, "") if config.aspect_prompt == "question" else ""


def preferred_summary(doc: Document, profile: UserProfile, config: RunConfig) -> str:
    """What ``profile`` judges a summary of ``doc`` against: its aspect's reference, or under
    ``partitioning = codes`` the target of the code that expresses what it wants."""
    if config.partitioning == "codes":
        return codes.target(doc, codes.preferred_code(profile))
    return doc.summary(profile.aspect)


def judged_examples(
    corpus: Corpus, doc_ids: Sequence[str], profile: UserProfile, config: RunConfig
) -> tuple[Example, ...]:
    """(document, the user's preferred summary) examples of the given documents, neutrally prompted.

    What a user asks for feedback on: "summarize this", judged against what it wants.
    """
    by_id = corpus.by_id
    examples = []
    for doc_id in dict.fromkeys(doc_ids):  # unique, in order
        doc = by_id[doc_id]
        summary = preferred_summary(doc, profile, config)
        if summary:
            examples.append(Example(doc_id, profile.aspect, doc.text, summary, NEUTRAL_INSTRUCTION))
    return tuple(examples)


def report_examples(corpus: Corpus, config: RunConfig, profile: UserProfile) -> tuple[Example, ...]:
    """The held-out documents ``profile``'s user is evaluated on (reporting only), in order."""
    report = judged_examples(corpus, heldout_doc_ids(corpus, config), profile, config)
    return report[: config.eval_max_examples or None]


def abstracts(corpus: Corpus) -> dict[str, str]:
    return {doc.doc_id: doc.abstract for doc in corpus.documents}


EXPORT_FIELD = "flhf-export"  # a data file's column: the split it was exported under (JSON)
EXPORT_KEYS = ("seed", "heldout-split", "heldout-fraction", "reward-fraction", "val-fraction")


def export_stamp(config: RunConfig) -> str:
    """What decides which documents are held out, as an exported file records it."""
    mapping = config.to_mapping()
    return json.dumps({key: mapping[key] for key in EXPORT_KEYS}, sort_keys=True)


def export_user_documents(corpus: Corpus, user: int, num_users: int, config: RunConfig, path: Path) -> int:
    """Write user ``user``'s partition as a data file of its own (JSONL: ``id``, ``document``,
    one column per aspect, empty where the user holds no summary of that aspect, and
    :data:`EXPORT_FIELD`: the seed and fractions it was split with, which a run with others
    refuses).

    What a user's device would hold; a SuperNode given it as ``data-file`` serves that user
    from it, and the server never reads it. Returns the number of documents written.
    """
    part = user_partition(corpus, user, num_users, config)
    held = {(e.doc_id, e.aspect) for e in part.train + part.validation}
    rows = [
        {
            "id": doc.doc_id,
            config.document_field: doc.text,
            **{
                aspect: (summary if (doc.doc_id, aspect) in held else "") for aspect, summary in doc.summaries
            },
            EXPORT_FIELD: export_stamp(config),
        }
        for doc in corpus.documents
        if any((doc.doc_id, aspect) in held for aspect in corpus.aspects)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)
