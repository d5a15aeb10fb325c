"""What one ClientApp message needs, built once per process (or per node) wherever it can be.

In simulation one worker process serves many messages, of many users: the immutable,
expensive things are cached in the process, keyed by everything they depend on:

* the tokenizer (by model and the server's tokenizer hash and payload);
* the initial model (by model, size, vocabulary and seed): each message gets its own copy;
* a user's documents, profile and token ids (by run config, user, number of users and the
  user's own data file).

In deployment every message is a fresh process, so the same things are cached on the node's
disk instead, under ``<state-dir>/cache/`` (the node config's ``state-dir``), by a
fingerprint of what they depend on: the user's documents with their token ids (a fresh
process then never loads the corpus) and the initial model's files. A user's own state
(personal parameters, its round-0 judgements) lives in ``Context.state`` and its state
directory, never in these caches.

A SuperNode may hold its user's own documents: the node config's ``data-file`` (a
JSONL/JSON/CSV file with ``document-field`` and one column per aspect). That user then
trains, gives feedback and is judged on its own documents only (split by
:func:`flhf_core.data.document_role`, its held-out share standing in for the server's);
the server never reads them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import data, personal
from .batches import Encoded, encode
from .config import ConfigError, RunConfig
from .feedback import PooledExample
from .model import (
    TokenizerSpec,
    add_lora,
    build_model,
    canonical_parameters,
    client_tokenizer,
    load_pretrained,
    parameters_to_record,
    personal_parameter_names,
    record_to_parameters,
    select_device,
)
from .profiles import UserProfile, build_profile
from .protocol import ARRAYS, CONFIG, PHASE, RUN_NAME, SERVER_ROUND, TOKENIZER_JSON, TOKENIZER_SHA256
from .tracking import atomic_write_json, save_folder_atomically

DATA_FILE = "data-file"  # node config: the user's own documents
THREADS = "torch-threads"  # node config: this node's torch thread budget
CACHE_VERSION = 1  # bump when what the disk cache holds changes


# --------------------------------------------------------------------------
# Who this node serves, and how many threads it may use
# --------------------------------------------------------------------------
def user_identity(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config, checked."""
    try:
        user = int(context.node_config["partition-id"])
        num_users = int(context.node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            "node config must set integer 'partition-id' and 'num-partitions' "
            f"(got {dict(context.node_config)})"
        ) from None
    return user, num_users


def own_data_file(context: Context) -> Path | None:
    """The node config's ``data-file``, if this user brings its own documents."""
    value = context.node_config.get(DATA_FILE)
    if not value:
        return None
    path = Path(str(value)).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"node config {DATA_FILE}: {path} does not exist.")
    return path


def thread_budget(context: Context) -> int:
    """Torch threads for this client: the node config's ``torch-threads``, else the CPUs the
    simulation engine gave this worker (Ray sets ``OMP_NUM_THREADS`` to them), else all cores.

    Clients that train at once must share the cores; each using all of them slows every
    one down (oversubscription).
    """
    value = context.node_config.get(THREADS)
    if value is not None:
        if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
            raise ConfigError(f"node config {THREADS}: expected a positive integer, got {value!r}")
        return int(value)
    engine = os.environ.get("OMP_NUM_THREADS", "")
    return int(engine) if engine.isdigit() and int(engine) > 0 else os.cpu_count() or 1


# --------------------------------------------------------------------------
# The user's documents
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class UserDocuments:
    """Everything a user reads, by purpose (the four kinds never mix)."""

    user: int
    profile: UserProfile
    train: tuple[data.Example, ...]  # (document, summary) examples the user trains on
    validation: tuple[data.Example, ...]  # the user's validation examples
    feedback: tuple[data.Example, ...]  # its training documents, neutrally prompted
    reward: tuple[data.Example, ...]  # fresh documents: the reward that steers aggregation
    report: tuple[data.Example, ...]  # held-out documents, for reporting only
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
        def examples(kind: str) -> tuple[data.Example, ...]:
            return tuple(data.Example(*row) for row in payload[kind])

        kinds = ("train", "validation", "feedback", "reward", "report")
        return cls(int(payload["user"]), profile, *(examples(k) for k in kinds), bool(payload["own-data"]))


def corpus_documents(config: RunConfig, user: int, num_users: int) -> UserDocuments:
    """User ``user``'s documents in the shared corpus (its partition, by ``seed``)."""
    corpus = data.load_corpus(config)
    partition = data.user_partition(corpus, user, num_users, config)
    profile = build_profile(user, config.user_profiles, config.aspects, config.seed)
    return UserDocuments(
        user=user,
        profile=profile,
        train=partition.train,
        validation=partition.validation,
        feedback=data.aspect_examples(corpus, partition.feedback_doc_ids, profile.aspect),
        reward=data.aspect_examples(corpus, partition.reward_doc_ids, profile.aspect),
        report=data.report_examples(corpus, config, profile.aspect),
    )


def own_document_role(doc_id: str, config: RunConfig) -> str:
    """A document's role in a user's own file: the file is split on its own, with the run's
    fractions (its held-out share is the user's reporting set, standing in for the server's)."""
    share = {
        kind: data.unit_hash(config.seed, "own-data", kind, doc_id) for kind in ("heldout", "reward", "val")
    }
    if share["heldout"] < config.heldout_fraction:
        return data.HELDOUT
    if share["reward"] < config.reward_fraction:
        return data.REWARD
    return data.VALIDATION if share["val"] < config.val_fraction else data.TRAIN


def file_documents(config: RunConfig, user: int, path: Path) -> UserDocuments:
    """User ``user``'s documents from its own file, split by document as the corpus is.

    Under ``preference`` partitioning the user keeps its preferred aspect's summaries (as it
    would in the corpus); otherwise every aspect the file has.
    """
    if config.highlight_supervision:
        raise ConfigError(
            f"highlight-supervision: user {user}'s data file {path} has no highlight labels (aclsum's "
            "are not exported); use highlight-supervision=false with data files."
        )
    own = data.load_table(str(path), config.document_field, config.aspects)
    profile = build_profile(user, config.user_profiles, config.aspects, config.seed)
    roles: dict[str, list[data.Document]] = {}
    for doc in own.documents:
        roles.setdefault(own_document_role(doc.doc_id, config), []).append(doc)
    aspects = (profile.aspect,) if config.partitioning == "preference" else config.aspects

    def examples(role: str) -> tuple[data.Example, ...]:
        return tuple(
            data.Example(d.doc_id, a, d.text, d.summary(a), data.instruction_for(config, a))
            for d in roles.get(role, [])
            for a in aspects
            if d.summary(a)
        )

    def judged(role: str) -> tuple[data.Example, ...]:
        ids = [d.doc_id for d in roles.get(role, [])]
        return data.aspect_examples(own, ids, profile.aspect)

    documents = UserDocuments(
        user=user,
        profile=profile,
        train=examples(data.TRAIN),
        validation=examples(data.VALIDATION),
        feedback=judged(data.TRAIN),
        reward=judged(data.REWARD)[: config.reward_documents],
        report=judged(data.HELDOUT)[: config.eval_max_examples or None],
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
        folder / f"user-{user}-{fingerprint(CACHE_VERSION, config.to_mapping(), *key[1:])}.json"
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
            encode(tokenizer, documents.train, config.max_source_tokens, config.max_target_tokens),
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
        encoded = encode(tokenizer, documents.train, config.max_source_tokens, config.max_target_tokens)
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


# --------------------------------------------------------------------------
# Tokenizer and the initial model
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def cached_tokenizer(config: RunConfig, sha256: str, payload: bytes) -> PreTrainedTokenizerBase:
    return client_tokenizer(config, TokenizerSpec(sha256, payload))


_initial_models: dict[tuple, PreTrainedModel] = {}


def initial_model(context: Context, config: RunConfig, tokenizer) -> PreTrainedModel:
    """A fresh copy of the run's round-0 model: a tiny-t5 built from its seed, or the checkpoint.

    Built (or loaded) once per process. A built tiny-t5 is also saved in the node's disk
    cache, so that a fresh process loads it instead of initializing it; a checkpoint
    already lives in Hugging Face's own cache.
    """
    key = (config.model, config.tiny_t5_size, len(tokenizer), config.seed)
    if key not in _initial_models:
        folder = cache_dir(context)
        folder = (
            folder / f"model-{fingerprint(CACHE_VERSION, *key)}"
            if folder and config.model == "tiny-t5"
            else None
        )
        model = None
        if folder is not None and (folder / "config.json").is_file():
            with contextlib.suppress(ConfigError):  # unreadable: built again and saved again
                model = load_pretrained(folder)
        if model is None:
            model = build_model(config, tokenizer)
            if folder is not None:
                save_folder_atomically(folder, model.save_pretrained)
        _initial_models.clear()  # one run at a time per process
        _initial_models[key] = model
    return copy.deepcopy(_initial_models[key])


# --------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------
@dataclass
class UserSession:
    """Everything one handler call needs, built from the message and context."""

    config: RunConfig
    user: int
    num_users: int
    server_round: int
    phase: str
    server_config: ConfigRecord
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    data: UserDocuments
    encoded_train: Encoded  # token ids of data.train
    context: Context
    shared_names: frozenset[str]  # parameters that travel
    personal_names: frozenset[str]  # parameters that never leave this client
    fresh_personal: ArrayRecord  # personal parameters as a new user starts (the "global" view)
    restored: personal.Restored
    state_folder: Path
    received: RecordDict = field(default_factory=RecordDict)  # the message's content
    setup_seconds: float = 0.0  # building all of the above
    # ArrayRecords the reply carries besides the shared parameters (the reward model, if shared)
    outgoing: dict[str, ArrayRecord] = field(default_factory=dict)

    @property
    def profile(self) -> UserProfile:
        return self.data.profile

    def global_view(self) -> PreTrainedModel:
        """The received global model alone: personal parameters reset to a new user's."""
        if not self.personal_names:
            return self.model
        model = copy.deepcopy(self.model)
        record_to_parameters(model, self.fresh_personal, names=self.personal_names)
        return model


def open_session(message: Message, context: Context) -> UserSession:
    """Build what a handler needs: the caches make this cheap after a process's first message."""
    started = time.perf_counter()
    config = RunConfig.from_mapping(context.run_config)
    torch.set_num_threads(thread_budget(context))
    user, num_users = user_identity(context)
    server_config = message.content[CONFIG]
    sha = str(server_config[TOKENIZER_SHA256])
    tokenizer = cached_tokenizer(config, sha, bytes(server_config.get(TOKENIZER_JSON, b"")))
    is_train = message.metadata.message_type == MessageType.TRAIN
    documents, encoded = (
        cached_pooled_documents if config.mode == "centralized" and is_train else cached_documents
    )(context, config, user, num_users, tokenizer, sha)
    model = initial_model(context, config, tokenizer)
    if config.personalization == "lora":
        model = add_lora(model, config.lora_rank, seed=config.seed * 7_919 + user)
    personal_names = personal_parameter_names(model, config.personal_scope, config.personal_layers)
    shared_names = frozenset(canonical_parameters(model)) - personal_names
    record_to_parameters(model, message.content[ARRAYS], names=shared_names)
    fresh_personal = parameters_to_record(model, personal_names)
    run_name = str(server_config.get(RUN_NAME, config.run_name or "run"))
    folder = personal.state_dir(context, config, run_name, user)
    params = canonical_parameters(model)
    shapes = {name: tuple(params[name].shape) for name in personal_names}
    server_round = int(server_config.get(SERVER_ROUND, 0))
    # a train message of round r builds on the state of an earlier round; an evaluate message
    # of round r's model uses round r's (see personal's docstring: resumed runs replay rounds)
    restored = personal.restore(
        context, folder, config.personal_scope, shapes, server_round + (0 if is_train else 1)
    )
    if restored.record is not None:
        record_to_parameters(model, restored.record, names=personal_names)
    model.to(select_device(config.device))
    return UserSession(
        config=config,
        user=user,
        num_users=num_users,
        server_round=server_round,
        phase=str(server_config.get(PHASE, "sft")),
        server_config=server_config,
        tokenizer=tokenizer,
        model=model,
        data=documents,
        encoded_train=encoded,
        context=context,
        shared_names=shared_names,
        personal_names=personal_names,
        fresh_personal=fresh_personal,
        restored=restored,
        state_folder=folder,
        received=message.content,
        setup_seconds=time.perf_counter() - started,
    )
