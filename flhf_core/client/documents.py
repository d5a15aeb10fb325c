"""A user's documents: from the shared corpus, from the node's own data file, or pooled
(``mode = centralized``), with their token ids, cached once per process and on the node's disk.

In simulation one worker process serves many users: a user's documents, profile and token
ids are kept in the process, keyed by everything they depend on (run config, user, number of
users, the user's own data file, the tokenizer). In deployment every message is a fresh
process, so they are also written to the node's disk cache, ``<state-dir>/cache/`` (the node
config's ``state-dir``), under a fingerprint of the same things: a fresh process then never
loads the corpus. (:mod:`flhf_core.client.session` keeps the initial model in the same disk cache.)

A SuperNode may hold its user's own documents: the node config's ``data-file`` (a
JSONL/JSON/CSV file with ``document-field`` and one column per aspect). That user then
trains, gives feedback and is judged on its own documents only (split by
:func:`own_document_role`, its held-out share standing in for the server's); the server
never reads them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from flhf_core.common import atomic_write_json
from flhf_core.config import ConfigError, RunConfig
from flhf_core.data import partitions
from flhf_core.data.corpus import Document, Example, load_corpus, load_table
from flhf_core.data.extractor import VERSION as EXTRACTOR_VERSION
from flhf_core.learning.batches import Encoded, encode
from flhf_core.users.feedback import PooledExample
from flhf_core.users.profiles import UserProfile, build_profile

DATA_FILE = "data-file"  # node config: the user's own documents
# bump when what the disk cache holds changes (2: own files leave out held-out ids; 3: the
# extractor's sources and the prompt codes); the extractor's own version is in the key too
CACHE_VERSION = 3


def own_data_file(context: Context) -> Path | None:
    """The node config's ``data-file``, if this user brings its own documents."""
    value = context.node_config.get(DATA_FILE)
    if not value:
        return None
    path = Path(str(value)).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"node config {DATA_FILE}: {path} does not exist.")
    return path


# --------------------------------------------------------------------------
# The user's documents
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class UserDocuments:
    """Everything a user reads, by purpose (the four kinds never mix)."""

    user: int
    profile: UserProfile
    train: tuple[Example, ...]  # (document, summary) examples the user trains on
    validation: tuple[Example, ...]  # the user's validation examples
    feedback: tuple[Example, ...]  # its training documents, neutrally prompted
    reward: tuple[Example, ...]  # fresh documents: the reward that steers aggregation
    report: tuple[Example, ...]  # held-out documents, for reporting only
    own_data: bool = False  # from the node's data-file rather than the shared corpus

    def to_json(self) -> dict:
        kinds = ("train", "validation", "feedback", "reward", "report")
        return {
            "user": self.user,
            "own-data": self.own_data,
            **{kind: [list(dataclasses.astuple(e)) for e in getattr(self, kind)] for kind in kinds},
        }

    @classmethod
    def from_json(cls, payload: dict, profile: UserProfile) -> UserDocuments:
        def examples(kind: str) -> tuple[Example, ...]:
            return tuple(Example(*row) for row in payload[kind])

        kinds = ("train", "validation", "feedback", "reward", "report")
        return cls(int(payload["user"]), profile, *(examples(k) for k in kinds), bool(payload["own-data"]))


def corpus_documents(config: RunConfig, user: int, num_users: int) -> UserDocuments:
    """User ``user``'s documents in the shared corpus (its partition, by ``seed``)."""
    corpus = load_corpus(config)
    partition = partitions.user_partition(corpus, user, num_users, config)
    profile = build_profile(user, config.user_profiles, config.aspects, config.seed)
    return UserDocuments(
        user=user,
        profile=profile,
        train=partition.train,
        validation=partition.validation,
        feedback=partitions.judged_examples(corpus, partition.feedback_doc_ids, profile, config),
        reward=partitions.judged_examples(corpus, partition.reward_doc_ids, profile, config),
        report=partitions.report_examples(corpus, config, profile),
    )


def own_document_role(doc: Document, config: RunConfig, server_heldout: frozenset[str] | None = None) -> str:
    """A document's role in a user's own file: the file is split on its own, with the run's
    fractions (its held-out share is the user's reporting set, standing in for the server's).

    What the server holds out is held out here too, so a user never trains on, or steers by,
    what the server reports on: ``server_heldout`` (the ids of the server's official test split,
    :func:`server_heldout_ids`), or, where the server splits by hash (``None``), the ids that
    hash holds out. A file's own ``split`` column may only add held-out documents (its test rows).
    """
    if server_heldout is not None:
        if doc.doc_id in server_heldout:
            return partitions.HELDOUT
    elif partitions.unit_hash(config.seed, "heldout", doc.doc_id) < config.heldout_fraction:
        return partitions.HELDOUT
    if doc.split == "test":
        return partitions.HELDOUT
    share = {
        kind: partitions.unit_hash(config.seed, "own-data", kind, doc.doc_id)
        for kind in ("heldout", "reward", "val")
    }
    if share["heldout"] < config.heldout_fraction:
        return partitions.HELDOUT
    if share["reward"] < config.reward_fraction:
        return partitions.REWARD
    return partitions.VALIDATION if share["val"] < config.val_fraction else partitions.TRAIN


def server_heldout_ids(config: RunConfig) -> frozenset[str] | None:
    """The ids the server holds out when it holds out its dataset's official test split (the run
    corpus is read to know them), else None: the server splits by hash, which needs no corpus."""
    if config.heldout_split != "official":
        return None
    corpus = load_corpus(config)
    if partitions.heldout_by(corpus, config) != "official":
        return None
    return frozenset(partitions.heldout_doc_ids(corpus, config))


def check_export_stamp(config: RunConfig, path: Path) -> None:
    """A file ``flhf export-data`` wrote records the seed and fractions it was split with
    (:data:`~flhf_core.data.partitions.EXPORT_FIELD`); under others, its training documents may be
    the server's held-out ones: refused, naming the key that differs."""
    try:
        stamp = _first_row(path).get(partitions.EXPORT_FIELD)
        exported = json.loads(stamp) if stamp else None
    except (OSError, UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise ConfigError(f"node config {DATA_FILE}: {path} cannot be read: {error}") from None
    if not isinstance(exported, dict):
        return
    run = json.loads(partitions.export_stamp(config))
    for key in partitions.EXPORT_KEYS:
        if exported.get(key) != run[key]:
            raise ConfigError(
                f"node config {DATA_FILE}: {path} was exported with {key}={exported.get(key)}, this run has "
                f"{key}={run[key]}: its documents may be the server's held-out ones. Export it again with "
                f"{key}={run[key]} (flhf export-data)."
            )


def _first_row(path: Path) -> dict:
    """The first record of a JSONL, JSON or CSV data file ({} if it has none)."""
    import csv

    with path.open(newline="") as f:
        if path.suffix.lower() == ".csv":
            return next(csv.DictReader(f), {}) or {}
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(stripped)
        return rows[0] if rows and isinstance(rows[0], dict) else {}
    first = next((line for line in stripped.splitlines() if line.strip()), "")
    row = json.loads(first) if first else {}
    return row if isinstance(row, dict) else {}


def file_documents(config: RunConfig, user: int, path: Path) -> UserDocuments:
    """User ``user``'s documents from its own file, split by document as the corpus is.
    Documents the server holds out (by id, under the run's seed and held-out fraction) are among
    the user's held-out ones: a user never trains on, or steers by, what the server reports on.

    Under ``preference`` partitioning the user keeps its preferred aspect's summaries (as it
    would in the corpus); otherwise every aspect the file has.
    """
    if config.highlight_supervision:
        raise ConfigError(
            f"highlight-supervision: user {user}'s data file {path} has no highlight labels (aclsum's "
            "are not exported); use highlight-supervision=false with data files."
        )
    check_export_stamp(config, path)
    own = load_table(str(path), config.document_field, config.aspects)
    profile = build_profile(user, config.user_profiles, config.aspects, config.seed)
    server_heldout = server_heldout_ids(config)
    roles: dict[str, list[Document]] = {}
    for doc in own.documents:
        roles.setdefault(own_document_role(doc, config, server_heldout), []).append(doc)
    aspects = (profile.aspect,) if config.partitioning == "preference" else config.aspects

    def examples(role: str) -> tuple[Example, ...]:
        if config.partitioning == "codes":
            docs = roles.get(role, [])
            return tuple(e for d in docs for e in partitions.code_examples(d, config.aspects, config))
        return tuple(
            Example(
                d.doc_id,
                a,
                partitions.reading(d, a, config),
                d.summary(a),
                partitions.instruction_for(config, a),
            )
            for d in roles.get(role, [])
            for a in aspects
            if d.summary(a)
        )

    def judged(role: str) -> tuple[Example, ...]:
        ids = [d.doc_id for d in roles.get(role, [])]
        return partitions.judged_examples(own, ids, profile, config)

    documents = UserDocuments(
        user=user,
        profile=profile,
        train=examples(partitions.TRAIN),
        validation=examples(partitions.VALIDATION),
        feedback=judged(partitions.TRAIN),
        reward=judged(partitions.REWARD)[: config.reward_documents],
        report=judged(partitions.HELDOUT)[: config.eval_max_examples or None],
        own_data=True,
    )
    empty = [k for k in ("train", "validation", "reward", "report") if not getattr(documents, k)]
    if empty:
        raise ConfigError(
            f"node config {DATA_FILE}: {path} has {len(own.documents)} usable documents, too few to give "
            f"this user {', '.join(empty)} documents (split by heldout-fraction, reward-fraction and "
            "val-fraction); give it more documents."
        )
    return documents


def pooled_documents(learner: UserDocuments, config: RunConfig, num_users: int) -> UserDocuments:
    """``mode = centralized``: the learner holds every user's training examples and feedback
    documents (each feedback document tagged with the user it came from, who judges its
    samples), and keeps its own validation, reward and held-out documents to report on."""
    users = [
        learner if u == learner.user else corpus_documents(config, u, num_users) for u in range(num_users)
    ]
    return dataclasses.replace(
        learner,
        train=tuple(e for user in users for e in user.train),
        feedback=tuple(
            PooledExample(*dataclasses.astuple(e), profile=user.profile)
            for user in users
            for e in user.feedback
        ),
    )


def file_stamp(path: Path | None) -> str:
    """What changes when a data file changes (part of the cache keys)."""
    if path is None:
        return ""
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


# --------------------------------------------------------------------------
# Caches: this process's, and the node's disk (deployment: a fresh process per message)
# --------------------------------------------------------------------------
PROCESS_CACHE_USERS = 256  # users whose documents a worker process keeps (least recently used go)
_user_cache: OrderedDict[tuple, tuple[UserDocuments, Encoded]] = OrderedDict()


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_dir(context: Context) -> Path | None:
    """``<state-dir>/cache`` on a node that has a state directory (deployment), else None."""
    root = context.node_config.get("state-dir")
    return Path(str(root)).expanduser().resolve() / "cache" if root else None


def encode_training(tokenizer, documents: UserDocuments, config: RunConfig) -> Encoded:
    """The token ids of the user's training examples, as the run's batches need them."""
    return encode(
        tokenizer,
        documents.train,
        config.max_source_tokens,
        config.max_target_tokens,
        config.prompt_code_start,
    )


def cached_documents(
    context: Context, config: RunConfig, user: int, num_users: int, tokenizer, tokenizer_sha: str
) -> tuple[UserDocuments, Encoded]:
    """The user's documents and its training examples' token ids: from this process's cache,
    else the node's disk cache, else built (and then written to the disk cache)."""
    own_file = own_data_file(context)
    key = (config, user, num_users, str(own_file), file_stamp(own_file), tokenizer_sha)
    if key in _user_cache:
        _user_cache.move_to_end(key)
        return _user_cache[key]
    folder = cache_dir(context)
    path = (
        folder
        / f"user-{user}-{fingerprint(CACHE_VERSION, EXTRACTOR_VERSION, config.to_mapping(), *key[1:])}.json"
        if folder
        else None
    )
    found = _read_cached(path, config, user) if path is not None else None
    if found is None:
        documents = (
            corpus_documents(config, user, num_users)
            if own_file is None
            else file_documents(config, user, own_file)
        )
        found = (
            documents,
            encode_training(tokenizer, documents, config),
        )
        if path is not None:
            atomic_write_json(path, {**documents.to_json(), "tokens": found[1].to_json()})
    _user_cache[key] = found
    while len(_user_cache) > PROCESS_CACHE_USERS:
        _user_cache.popitem(last=False)
    return found


def cached_pooled_documents(
    context: Context, config: RunConfig, user: int, num_users: int, tokenizer, tokenizer_sha: str
) -> tuple[UserDocuments, Encoded]:
    """The centralized learner's documents (:func:`pooled_documents`) and token ids, once per process."""
    if own_data_file(context) is not None:
        raise ConfigError(
            f"mode: 'centralized' pools every user's documents from the shared corpus; node {user}'s "
            f"{DATA_FILE} cannot be pooled. Use mode='federated' with data files."
        )
    key = (config, "pooled", user, num_users, tokenizer_sha)
    if key not in _user_cache:
        learner, _ = cached_documents(context, config, user, num_users, tokenizer, tokenizer_sha)
        documents = pooled_documents(learner, config, num_users)
        encoded = encode_training(tokenizer, documents, config)
        _user_cache[key] = (documents, encoded)
    _user_cache.move_to_end(key)
    return _user_cache[key]


def _read_cached(path: Path, config: RunConfig, user: int) -> tuple[UserDocuments, Encoded] | None:
    """A disk-cached user's documents and token ids; None if absent or unreadable (then rebuilt)."""
    try:
        payload = json.loads(path.read_text())
        profile = build_profile(user, config.user_profiles, config.aspects, config.seed)
        documents = UserDocuments.from_json(payload, profile)
        encoded = Encoded.from_json(payload["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (documents, encoded) if len(encoded) == len(documents.train) else None
