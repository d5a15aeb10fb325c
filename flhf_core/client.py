"""What a user's device does with a message: the logic behind the ClientApp.

Each handler reads the run config, the user's partition (from the node
config's ``partition-id`` / ``num-partitions``), checks the tokenizer against
the server's hash, loads the received parameters, does its work and replies
with parameters and/or a MetricRecord, plus a ConfigRecord naming the user.
Module-level caches hold only immutable things (the corpus, via ``data``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import data, personal
from .algorithms import FEEDBACK_ALGORITHMS
from .algorithms.rollout import FeedbackConfig
from .algorithms.sft import SFTConfig, train_sft
from .config import ConfigError, RunConfig
from .feedback import Judgement, UserProfile, build_profile, judge, preference_probability
from .generate import DecodingConfig, generate_summaries
from .metrics import evaluate_model
from .model import (
    TokenizerSpec,
    add_lora,
    build_model,
    canonical_parameters,
    client_tokenizer,
    parameters_to_record,
    personal_parameter_names,
    record_to_parameters,
    select_device,
)
from .protocol import (
    ARRAYS,
    CONFIG,
    LEARNING_RATE,
    METRICS,
    NUM_USERS,
    PHASE,
    RUN_NAME,
    SERVER_ROUND,
    TOKENIZER_JSON,
    TOKENIZER_SHA256,
    USER_ID,
    USER_RECORD,
)


@dataclass
class UserSession:
    """Everything one handler call needs, built from the message and context."""

    config: RunConfig
    user: int
    server_round: int
    phase: str
    server_config: ConfigRecord
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    data: data.UserData
    profile: UserProfile
    feedback_docs: tuple[data.Example, ...]  # the user's training documents, neutrally prompted
    reward_docs: tuple[data.Example, ...]  # the user's fresh documents: the reward that steers aggregation
    report_docs: tuple[data.Example, ...]  # the server's held-out documents: for reporting only
    context: Context
    shared_names: frozenset[str]  # parameters that travel
    personal_names: frozenset[str]  # parameters that never leave this client
    fresh_personal: ArrayRecord  # personal parameters as a new user starts (the "global" view)
    restored: personal.Restored
    state_folder: Path

    def global_view(self) -> PreTrainedModel:
        """The received global model alone: personal parameters reset to a new user's."""
        if not self.personal_names:
            return self.model
        model = copy.deepcopy(self.model)
        record_to_parameters(model, self.fresh_personal, names=self.personal_names)
        return model


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
        sha256=str(server_config[TOKENIZER_SHA256]),
        payload=bytes(server_config.get(TOKENIZER_JSON, b"")),
    )
    tokenizer = client_tokenizer(config, spec)
    model = build_model(config, tokenizer)
    if config.personalization == "lora":
        model = add_lora(model, config.lora_rank, seed=config.seed * 7_919 + user)
    personal_names = personal_parameter_names(model, config.personalization, config.personal_layers)
    shared_names = frozenset(canonical_parameters(model)) - personal_names
    record_to_parameters(model, message.content[ARRAYS], names=shared_names)
    fresh_personal = parameters_to_record(model, personal_names)
    run_name = str(server_config.get(RUN_NAME, config.run_name or "run"))
    folder = personal.state_dir(context, config, run_name, user)
    restored = personal.restore(
        context, folder, config.personalization, parameter_shapes(model, personal_names)
    )
    if restored.record is not None:
        record_to_parameters(model, restored.record, names=personal_names)
    model.to(select_device(config.device))
    corpus = data.load_corpus(config)
    partition = data.user_partition(corpus, user, num_users, config)
    profile = build_profile(user, config.user_profiles, corpus.aspects, config.seed)
    report_docs = data.aspect_examples(corpus, data.heldout_doc_ids(corpus, config), profile.aspect)
    return UserSession(
        config=config,
        user=user,
        server_round=int(server_config.get(SERVER_ROUND, 0)),
        phase=str(server_config.get(PHASE, "sft")),
        server_config=server_config,
        tokenizer=tokenizer,
        model=model,
        data=partition,
        profile=profile,
        feedback_docs=data.aspect_examples(corpus, partition.feedback_doc_ids, profile.aspect),
        reward_docs=data.aspect_examples(corpus, partition.reward_doc_ids, profile.aspect),
        report_docs=report_docs[: config.eval_max_examples or None],
        context=context,
        shared_names=shared_names,
        personal_names=personal_names,
        fresh_personal=fresh_personal,
        restored=restored,
        state_folder=folder,
    )


def parameter_shapes(model: PreTrainedModel, names: frozenset[str]) -> dict[str, tuple[int, ...]]:
    params = canonical_parameters(model)
    return {name: tuple(params[name].shape) for name in names}


def reply(message: Message, session: UserSession, metrics: dict[str, float], with_arrays: bool) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics), USER_RECORD: ConfigRecord({USER_ID: session.user})})
    if with_arrays:  # only the shared parameters ever leave
        content[ARRAYS] = parameters_to_record(session.model, session.shared_names)
    return Message(content=content, reply_to=message)


def state_metrics(session: UserSession) -> dict[str, float]:
    """Where the personal parameters came from this round (1.0 = restored from that source)."""
    if not session.personal_names:
        return {}
    return {
        "state-from-context": float(session.restored.source == "context"),
        "state-from-file": float(session.restored.source == "file"),
        "state-unreadable": float(bool(session.restored.problem)),
    }


def user_judgements(
    session: UserSession, model: PreTrainedModel, documents: tuple[data.Example, ...]
) -> list[Judgement]:
    """The user's true judgement of ``model``'s greedy summaries of ``documents``.

    Two sets are ever judged, and never mixed: the user's fresh reward documents, whose
    reward steers aggregation (train replies), and the server's held-out documents, whose
    reward is only reported (evaluate replies).
    """
    summaries = generate_summaries(
        model,
        session.tokenizer,
        [e.source for e in documents],
        DecodingConfig.from_run_config(session.config),
        session.config.max_source_tokens,
    )
    return [judge(session.profile, s, e.summary) for s, e in zip(summaries, documents, strict=True)]


def reward_metrics(judgements: list[Judgement], prefix: str = "reward") -> dict[str, float]:
    """Mean utility and its factors: ``reward``, ``reward-content``, ``reward-length``, ..."""
    if not judgements:
        raise ValueError(
            "no documents to judge the model on (reward-fraction, reward-documents or heldout-fraction too small)"
        )
    return {
        prefix: float(np.mean([j.utility for j in judgements])),
        f"{prefix}-content": float(np.mean([j.content for j in judgements])),
        f"{prefix}-length": float(np.mean([j.length for j in judgements])),
        f"{prefix}-keywords": float(np.mean([j.keywords for j in judgements])),
    }


def text_metrics(judgements: list[Judgement]) -> dict[str, float]:
    """Output length and repetition of the judged summaries (reward-hacking diagnostics)."""
    return {
        "output-words": float(np.mean([j.words for j in judgements])),
        "repetition": float(np.mean([j.repetition for j in judgements])),
    }


def round_seed(session: UserSession, stream: int) -> int:
    return session.config.seed * 100_003 + session.user * 1_009 + session.server_round * 17 + stream


def train(message: Message, context: Context) -> Message:
    """One local round: supervised fine-tuning, or learning from the user's feedback.

    The reply's ``reward`` is the user's mean true utility of the updated model's summaries
    of the user's own fresh documents (nobody trains on them; the server's held-out
    documents are never used here), ``reward-before`` that of the received model.
    """
    session = open_session(message, context)
    config = session.config
    signal_training(context, session.server_round)
    before = reward_metrics(user_judgements(session, session.model, session.reward_docs), "reward-before")
    torch.manual_seed(round_seed(session, 0))  # dropout masks
    metrics = local_sft(session) if session.phase == "sft" else local_feedback(session)
    after = user_judgements(session, session.model, session.reward_docs)
    metrics.update(before)
    metrics.update(reward_metrics(after))
    metrics["reward-gain"] = metrics["reward"] - metrics["reward-before"]
    metrics.update(text_metrics(after))
    metrics["learning-rate"] = float(session.server_config.get(LEARNING_RATE, config.learning_rate))
    metrics.update(state_metrics(session))
    if session.personal_names:
        personal_record = parameters_to_record(session.model, session.personal_names)
        personal.persist(
            context, session.state_folder, personal_record, config.personalization, session.server_round
        )
    return reply(message, session, metrics, with_arrays=True)


def signal_training(context: Context, server_round: int) -> None:
    """Touch the node config's ``training-marker`` file, if any: "local training has started".

    Lets an operator (or a failure test) act at a known point of a round without sleeping.
    """
    marker = context.node_config.get("training-marker")
    if marker:
        path = Path(str(marker))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{server_round}\n")


def local_sft(session: UserSession) -> dict[str, float]:
    """The SFT update; with personal parameters, FedRep's alternating order.

    FedRep (Collins et al., 2021, https://arxiv.org/abs/2102.07078): first the personal
    parameters alone, for ``personal-epochs``, fitted to the global model just received;
    then the shared ones alone, for ``local-epochs``, with the personal ones fixed. Trained
    jointly instead, the personal parameters co-adapt with a local copy of the shared ones
    that the server's average replaces next round, and the personalized model falls behind
    the global one for some users (measured: see README). ``personal-epochs = 0`` trains
    everything together.
    """
    config = session.config
    learning_rate = float(session.server_config.get(LEARNING_RATE, config.learning_rate))
    sft = SFTConfig.from_run_config(config, learning_rate=learning_rate, seed=round_seed(session, 1))
    personal_metrics: dict[str, float] = {}
    alternate = bool(session.personal_names) and config.personal_epochs > 0
    if alternate:
        with only_trainable(session.model, session.personal_names):
            personal = train_sft(
                session.model,
                session.tokenizer,
                session.data.train,
                replace(sft, epochs=config.personal_epochs),
            )
        personal_metrics = {
            "personal-loss-first": personal.first_loss,
            "personal-loss-last": personal.last_loss,
            "personal-seconds": personal.seconds,
        }
    with only_trainable(session.model, session.shared_names) if alternate else nullcontext():
        stats = train_sft(session.model, session.tokenizer, session.data.train, sft)
    return {
        **personal_metrics,
        "num-examples": len(session.data.train),
        "train-loss": stats.loss,
        "train-loss-first": stats.first_loss,
        "train-loss-last": stats.last_loss,
        "train-steps": stats.steps,
        "train-seconds": stats.seconds,  # the shared update; the personal one is personal-seconds
        "tokens-per-second": stats.tokens_per_second,
    }


@contextmanager
def only_trainable(model: PreTrainedModel, names: frozenset[str]) -> Iterator[None]:
    """Within the block, only the parameters called ``names`` receive gradients."""
    params = canonical_parameters(model)
    before = {name: p.requires_grad for name, p in params.items()}
    for name, p in params.items():
        p.requires_grad_(before[name] and name in names)
    try:
        yield
    finally:
        for name, p in params.items():
            p.requires_grad_(before[name])


def local_feedback(session: UserSession) -> dict[str, float]:
    config = session.config
    feedback = FeedbackConfig.from_run_config(config)
    if not session.feedback_docs:
        raise ValueError(f"user {session.user} holds no documents to give feedback on")
    update = FEEDBACK_ALGORITHMS[config.feedback_algorithm]
    rng = np.random.default_rng(round_seed(session, 2))
    started = time.perf_counter()
    stats = update(
        session.model, session.tokenizer, list(session.feedback_docs), session.profile, feedback, rng
    )
    return {
        "num-examples": len(session.feedback_docs),
        "train-seconds": time.perf_counter() - started,
        **{f"train-{k}": v for k, v in stats.items()},
    }


ROUND0_RECORD = "round0-utilities"


def round0_utilities(session: UserSession) -> list[float]:
    """The user's utilities of the round-0 model's summaries (the win-rate baseline).

    The round-0 model is rebuilt from the seed (or the pretrained checkpoint), so its
    summaries never change: they are judged once and kept in Context.state.
    """
    doc_ids = [e.doc_id for e in session.report_docs]
    cached = session.context.state.config_records.get(ROUND0_RECORD)
    if cached is not None and list(cached["doc-ids"]) == doc_ids:
        return list(cached["utilities"])
    initial = build_model(session.config, session.tokenizer).to(next(session.model.parameters()).device)
    utilities = [j.utility for j in user_judgements(session, initial, session.report_docs)]
    session.context.state[ROUND0_RECORD] = ConfigRecord({"doc-ids": doc_ids, "utilities": utilities})
    return utilities


def evaluate(message: Message, context: Context) -> Message:
    """The received global model on the user's validation data, as the user sees it.

    Loss, perplexity and ROUGE on the validation examples; the user's reward on the
    server's held-out documents (reported, never used for training or weighting); and the
    win rate against the round-0 model: the Bradley-Terry probability, under the user's
    true utility, that the user prefers the global model's summary of a document to the
    round-0 model's, averaged over documents. With personal parameters, the same figures
    for the user's personalized model (``-personal``). Under ``local-head`` there is no
    global model to evaluate (the head exists only on the clients): personal figures only.
    """
    session = open_session(message, context)
    config = session.config
    examples = session.data.validation[: config.eval_max_examples or None]
    if not examples:
        raise ValueError(f"user {session.user} has no validation examples (val-fraction too small)")
    metrics: dict[str, float] = {"num-examples": len(examples), **state_metrics(session)}
    if config.has_global_model:
        global_model = session.global_view()
        judgements = user_judgements(session, global_model, session.report_docs)
        baseline = round0_utilities(session)
        win_rate = np.mean(
            [
                preference_probability(session.profile, new.utility, old)
                for new, old in zip(judgements, baseline, strict=True)
            ]
        )
        metrics.update(evaluate_model(global_model, session.tokenizer, examples, config))
        metrics.update(reward_metrics(judgements))
        metrics.update(text_metrics(judgements))
        metrics["win-rate"] = float(win_rate)
    if session.personal_names:  # the user's personalized model, on the same data
        personalized = evaluate_model(session.model, session.tokenizer, examples, config)
        metrics.update({f"{k}-personal": v for k, v in personalized.items()})
        metrics.update(
            reward_metrics(user_judgements(session, session.model, session.report_docs), "reward-personal")
        )
        if "reward" in metrics:
            metrics["personalization-gain"] = metrics["reward-personal"] - metrics["reward"]
    return reply(message, session, metrics, with_arrays=False)


def identify(message: Message, context: Context) -> Message:
    """Which user this node serves: its ``partition-id`` and ``num-partitions``.

    The server asks once per node and run, so that it samples users (the same ones in
    every run with the same seed) instead of Flower's random node ids.
    """
    user, num_users = user_identity(context)
    content = RecordDict({USER_RECORD: ConfigRecord({USER_ID: user, NUM_USERS: num_users})})
    return Message(content=content, reply_to=message)
