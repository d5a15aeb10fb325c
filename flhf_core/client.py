"""What a user's device does with a message: the logic behind the ClientApp.

Each handler reads the run config, the user's partition (from the node
config's ``partition-id`` / ``num-partitions``), checks the tokenizer against
the server's hash, loads the received parameters, does its work and replies
with parameters and/or a MetricRecord, plus a ConfigRecord naming the user.
Module-level caches hold only immutable things (the corpus, via ``data``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import data
from .algorithms.sft import SFTConfig, train_sft
from .config import ConfigError, RunConfig
from .metrics import evaluate_model
from .model import (
    TokenizerSpec,
    build_model,
    client_tokenizer,
    parameters_to_record,
    record_to_parameters,
    select_device,
)
from .strategy import USER_ID, USER_RECORD

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


@dataclass
class UserSession:
    """Everything one handler call needs, built from the message and context."""

    config: RunConfig
    user: int
    server_round: int
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    data: data.UserData


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


def open_session(message: Message, context: Context) -> UserSession:
    config = RunConfig.from_mapping(context.run_config)
    user, num_users = user_identity(context)
    server_config = message.content[CONFIG]
    spec = TokenizerSpec(
        sha256=str(server_config["tokenizer-sha256"]),
        payload=bytes(server_config.get("tokenizer-json", b"")),
    )
    tokenizer = client_tokenizer(config, spec)
    model = build_model(config, tokenizer)
    record_to_parameters(model, message.content[ARRAYS])
    model.to(select_device(config.device))
    corpus = data.load_corpus(config)
    return UserSession(
        config=config,
        user=user,
        server_round=int(server_config.get("server-round", 0)),
        tokenizer=tokenizer,
        model=model,
        data=data.user_partition(corpus, user, num_users, config),
    )


def reply(message: Message, session: UserSession, metrics: dict[str, float], with_arrays: bool) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics), USER_RECORD: ConfigRecord({USER_ID: session.user})})
    if with_arrays:
        content[ARRAYS] = parameters_to_record(session.model)
    return Message(content=content, reply_to=message)


def train(message: Message, context: Context) -> Message:
    """Local supervised fine-tuning on the user's (document, summary) pairs."""
    session = open_session(message, context)
    config = session.config
    sft = SFTConfig(
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        learning_rate=float(message.content[CONFIG].get("learning-rate", config.learning_rate)),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=config.bf16,
        max_source_tokens=config.max_source_tokens,
        max_target_tokens=config.max_target_tokens,
        seed=config.seed * 100_003 + session.user * 1_009 + session.server_round,
    )
    torch.manual_seed(sft.seed)  # dropout masks
    stats = train_sft(session.model, session.tokenizer, session.data.train, sft)
    metrics = {
        "num-examples": len(session.data.train),
        "train-loss": stats.loss,
        "train-loss-first": stats.first_loss,
        "train-loss-last": stats.last_loss,
        "train-steps": stats.steps,
        "train-seconds": stats.seconds,
        "tokens-per-second": stats.tokens_per_second,
    }
    return reply(message, session, metrics, with_arrays=True)


def evaluate(message: Message, context: Context) -> Message:
    """The received model on the user's validation examples."""
    session = open_session(message, context)
    examples = session.data.validation
    if session.config.eval_max_examples:
        examples = examples[: session.config.eval_max_examples]
    if not examples:
        raise ValueError(f"user {session.user} has no validation examples (val-fraction too small)")
    metrics = {
        "num-examples": len(examples),
        **evaluate_model(session.model, session.tokenizer, examples, session.config),
    }
    return reply(message, session, metrics, with_arrays=False)
