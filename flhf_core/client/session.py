"""What one ClientApp message needs, built once per process (or per node) wherever it can be.

In simulation one worker process serves many messages, of many users: the immutable,
expensive things are cached in the process, keyed by everything they depend on:

* the tokenizer (by model, where this node loads it from, and the server's tokenizer hash and payload);
* the initial model (by where it is loaded from, size, vocabulary and seed): each message gets its own copy;
* a user's documents, profile and token ids (:mod:`flhf_core.client.documents`).

In deployment every message is a fresh process, so the same things are cached on the node's
disk instead, under ``<state-dir>/cache/`` (the node config's ``state-dir``), by a
fingerprint of what they depend on: the user's documents with their token ids and the
initial model's files. A user's own state (personal parameters, its round-0 judgements)
lives in ``Context.state`` and its state directory, never in these caches.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flhf_core.client import personal
from flhf_core.client.documents import (
    CACHE_VERSION,
    UserDocuments,
    cache_dir,
    cached_documents,
    cached_pooled_documents,
    fingerprint,
)
from flhf_core.common import plain_name, save_folder_atomically
from flhf_core.config import ConfigError, RunConfig
from flhf_core.data.codes import all_codes
from flhf_core.data.corpus import Example
from flhf_core.learning import warm_start
from flhf_core.learning.batches import Encoded
from flhf_core.learning.code_bandit import served_prompt
from flhf_core.learning.model import (
    TokenizerSpec,
    build_model,
    canonical_parameters,
    client_tokenizer,
    load_pretrained,
    parameters_to_record,
    personal_parameter_names,
    record_to_parameters,
    select_device,
    with_personal_parameters,
)
from flhf_core.protocol import ARRAYS, CONFIG, PHASE, RUN_NAME, SERVER_ROUND, TOKENIZER_JSON, TOKENIZER_SHA256
from flhf_core.users.profiles import UserProfile

THREADS = "torch-threads"  # node config: this node's torch thread budget
MODEL_PATH = "model-path"  # node config: a local folder holding the run's hub model


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
# Tokenizer and the initial model
# --------------------------------------------------------------------------
def model_source(context: Context, config: RunConfig) -> str:
    """Where this node loads the run's ``model`` and its tokenizer from: the node config's
    ``model-path``, else ``model`` itself (a Hugging Face name or a path).

    ``model-path`` serves a SuperNode without access to the hub: a folder holding the same
    checkpoint (``save_pretrained`` of model and tokenizer, or a download of the hub's files).
    Both are read by ``from_pretrained``, the one code path; the server's tokenizer hash still
    decides whether the folder's tokenizer is the run's. A ``tiny-t5`` is built from the run
    config and ``minilm-warm-start`` from the installed checkpoint, never loaded by name: there
    the key has nothing to say.
    """
    path = context.node_config.get(MODEL_PATH)
    if path is None or config.model in ("tiny-t5", warm_start.NAME):  # built, never loaded by name
        return config.model
    folder = Path(str(path)).expanduser()
    if not str(path).strip() or not folder.is_dir():
        raise ConfigError(
            f"node config {MODEL_PATH}: {str(path)!r} is not a folder; give a folder holding the run's "
            f"model {config.model!r} (its save_pretrained files), or leave {MODEL_PATH} out to load it "
            "by name."
        )
    return str(folder)


@functools.lru_cache(maxsize=8)
def cached_tokenizer(config: RunConfig, source: str, sha256: str, payload: bytes) -> PreTrainedTokenizerBase:
    """The client's tokenizer of the run ``config``, loaded from ``source`` (:func:`model_source`)."""
    return client_tokenizer(config.replace(model=source), TokenizerSpec(sha256, payload))


_initial_models: dict[tuple, PreTrainedModel] = {}


def initial_model(context: Context, config: RunConfig, tokenizer) -> PreTrainedModel:
    """A fresh copy of the run's round-0 model: a tiny-t5 built from its seed, or the checkpoint
    (from where :func:`model_source` says).

    Built (or loaded) once per process. A built tiny-t5 is also saved in the node's disk
    cache, so that a fresh process loads it instead of initializing it; a checkpoint
    already lives in Hugging Face's own cache, or in the node's ``model-path``.
    """
    source = model_source(context, config)
    key = (source, config.tiny_t5_size, config.copy_attention, len(tokenizer), config.seed)
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
            model = build_model(config.replace(model=source), tokenizer)
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
    fresh_personal: dict[str, torch.Tensor]  # personal parameters as a new user starts (the "global" view)
    restored: personal.Restored
    state_folder: Path
    received: RecordDict = field(default_factory=RecordDict)  # the message's content
    setup_seconds: float = 0.0  # building all of the above
    # ArrayRecords the reply carries besides the shared parameters (the reward model, if shared)
    outgoing: dict[str, ArrayRecord] = field(default_factory=dict)

    @property
    def profile(self) -> UserProfile:
        return self.data.profile

    def as_asked(self, examples: Sequence[Example]) -> tuple[Example, ...]:
        """How the user asks its own model for ``examples``: as they are, or under
        ``code-bandit`` once it has ratings, with the control code its bandit serves (the best
        posterior mean)."""
        if self.config.personalization != "code-bandit":
            return tuple(examples)
        prompt = served_prompt(self.model, [code.prompt for code in all_codes(self.config.aspects)])
        if prompt is None:  # nothing rated yet: the user asks neutrally, as everyone
            return tuple(examples)
        return tuple(dataclasses.replace(e, instruction=prompt) for e in examples)

    def global_view(self) -> PreTrainedModel:
        """The received global model alone: personal parameters reset to a new user's."""
        if not self.personal_names:
            return self.model
        model = copy.deepcopy(self.model)
        params = canonical_parameters(model)
        with torch.no_grad():
            for name, value in self.fresh_personal.items():
                params[name].copy_(value)
        return model


def open_session(message: Message, context: Context) -> UserSession:
    """Build what a handler needs: the caches make this cheap after a process's first message."""
    started = time.perf_counter()
    config = RunConfig.from_mapping(context.run_config)
    torch.set_num_threads(thread_budget(context))
    user, num_users = user_identity(context)
    server_config = message.content[CONFIG]
    sha = str(server_config[TOKENIZER_SHA256])
    tokenizer = cached_tokenizer(
        config, model_source(context, config), sha, bytes(server_config.get(TOKENIZER_JSON, b""))
    )
    is_train = message.metadata.message_type == MessageType.TRAIN
    documents, encoded = (
        cached_pooled_documents if config.mode == "centralized" and is_train else cached_documents
    )(context, config, user, num_users, tokenizer, sha)
    model = initial_model(context, config, tokenizer)
    model = with_personal_parameters(model, config, seed=config.seed * 7_919 + user)
    personal_names = personal_parameter_names(model, config.personal_scope, config.personal_layers)
    shared_names = frozenset(canonical_parameters(model)) - personal_names
    record_to_parameters(model, message.content[ARRAYS], names=shared_names)
    params = canonical_parameters(model)
    fresh_personal = {name: params[name].detach().clone() for name in personal_names}
    run_name = plain_name(str(server_config.get(RUN_NAME, config.run_name or "run")), "the run name sent")
    folder = personal.state_dir(context, config, run_name, user)
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


def save_personal(session: UserSession) -> None:
    """Keep the personal parameters on the device (``Context.state`` and the state folder)."""
    if session.personal_names:
        personal.persist(
            session.context,
            session.state_folder,
            parameters_to_record(session.model, session.personal_names),
            session.config.personal_scope,
            session.server_round,
            window=session.config.checkpoint_every,
        )
