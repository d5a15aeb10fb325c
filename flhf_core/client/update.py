"""The user's local update: supervised fine-tuning on the user's own examples, or learning from
the user's feedback with the run's algorithm. With personal parameters, FedRep's order:
the personal ones first, then the shared ones.

Everything random in it is keyed by the seed, the user and the round (:func:`round_seed`), so
a resumed run replays a round exactly.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import numpy as np
import torch
from transformers import PreTrainedModel

from flhf_core.client import reward_models
from flhf_core.client.session import UserSession
from flhf_core.config import RunConfig
from flhf_core.data.codes import all_codes
from flhf_core.learning.algorithms import FEEDBACK_ALGORITHMS
from flhf_core.learning.algorithms.rollout import FeedbackConfig
from flhf_core.learning.algorithms.scorer import LearnedScorer, Scorer
from flhf_core.learning.algorithms.sft import SFTConfig, train_sft
from flhf_core.learning.code_bandit import bandit_of
from flhf_core.learning.generate import summarize
from flhf_core.learning.model import canonical_parameters
from flhf_core.protocol import LEARNING_RATE
from flhf_core.users.feedback import judge, score

FEEDBACK_ONLY = ("soft-prompt", "code-bandit")  # personalizations whose state supervised rounds leave alone


def local_update(session: UserSession) -> dict[str, float]:
    """Update ``session.model`` in place for this round's phase; the update's figures."""
    torch.manual_seed(round_seed(session, 0))  # dropout masks
    if session.phase == "sft":
        return {**local_sft(session), "learning-rate": learning_rate(session)}
    return local_feedback(session)  # each pass reports its own rate


def learning_rate(session: UserSession) -> float:
    """This round's supervised learning rate: the server's schedule, else the config's."""
    return float(session.server_config.get(LEARNING_RATE, session.config.learning_rate))


def round_seed(session: UserSession, stream: int) -> int:
    return session.config.seed * 100_003 + session.user * 1_009 + session.server_round * 17 + stream


def interactive() -> bool:
    """Whether a person watches this process's output: a progress bar for the local update
    then (an in-process run in a terminal); none in logs (Flower's workers, CI)."""
    return sys.stderr.isatty()


def local_sft(session: UserSession) -> dict[str, float]:
    """The SFT update; with personal parameters, FedRep's alternating order.

    FedRep (Collins et al., 2021, https://arxiv.org/abs/2102.07078): first the personal
    parameters alone, for ``personal-epochs``, fitted to the global model just received;
    then the shared ones alone, for ``local-epochs``, with the personal ones fixed. Trained
    jointly instead, the personal parameters co-adapt with a local copy of the shared ones
    that the server's average replaces next round, and the personalized model falls behind
    the global one for some users (measured: see docs/personalization.md). ``personal-epochs = 0`` trains
    everything together.
    """
    config = session.config
    sft = SFTConfig.from_run_config(config, learning_rate=learning_rate(session), seed=round_seed(session, 1))
    personal_metrics: dict[str, float] = {}
    # soft-prompt and code-bandit learn from feedback only: their state stays as it is here
    feedback_only = config.personalization in FEEDBACK_ONLY
    # (local-only: every parameter is the user's own, nothing to alternate with)
    alternate = (
        bool(session.personal_names)
        and bool(session.shared_names)
        and config.personal_epochs > 0
        and not feedback_only
    )
    frozen = only_trainable(session.model, session.shared_names) if feedback_only else nullcontext()
    if alternate:
        with only_trainable(session.model, session.personal_names):
            personal = train_sft(
                session.model,
                session.tokenizer,
                session.data.train,
                replace(sft, epochs=config.personal_epochs),
                progress=interactive(),
                encoded=session.encoded_train,
            )
        personal_metrics = {
            "personal-loss-first": personal.first_loss,
            "personal-loss-last": personal.last_loss,
            "personal-seconds": personal.seconds,
        }
    with only_trainable(session.model, session.shared_names) if alternate else frozen:
        stats = train_sft(
            session.model,
            session.tokenizer,
            session.data.train,
            sft,
            progress=interactive(),
            encoded=session.encoded_train,
        )
    return {
        **personal_metrics,
        "num-examples": len(session.data.train),
        "train-loss": stats.loss,
        "train-loss-first": stats.first_loss,
        "train-loss-last": stats.last_loss,
        "train-steps": stats.steps,
        "train-ratings-used": 0.0,  # no feedback asked in a supervised round
        "shared-seconds": stats.seconds,  # the shared update; the personal one is personal-seconds
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
    """The feedback update; with personal parameters, FedRep's order as in :func:`local_sft`.

    The round's algorithm runs ``feedback-steps`` on the personal parameters alone (at
    ``personal-feedback-learning-rate``), then, unless ``feedback-learning-rate`` is 0, its
    ``feedback-steps`` again on the shared ones alone, with the personal ones fixed. Each pass
    samples its own candidates; the user's judgements of both count against one budget
    (``ratings-per-round``), spread over all the steps. Figures of the last pass are
    ``train-*``, of a personal pass before it ``personal-*``.
    """
    config = session.config
    feedback = FeedbackConfig.from_run_config(config)
    if config.mode == "centralized":
        # one learner: the steps of every user a federated round samples, one after another
        sampled = max(1, int(session.num_users * config.fraction_train))
        feedback = replace(feedback, steps=feedback.steps * sampled)
        budget_scale = sampled  # and the judgements of every such user
    else:
        budget_scale = 1
    if not session.data.feedback:
        raise ValueError(f"user {session.user} holds no documents to give feedback on")
    if config.personalization == "code-bandit":
        return bandit_feedback(session, feedback)
    passes = feedback_passes(session)
    update = FEEDBACK_ALGORITHMS[config.feedback_algorithm]
    rng = np.random.default_rng(round_seed(session, 2))
    ratings = config.ratings_per_round * budget_scale
    budget = (session.profile, ratings, feedback.steps * len(passes), feedback.samples_per_prompt)
    # with a reward model, it scores what the user did not judge (reward_models.py)
    scorer = (
        reward_models.learned_scorer(session, budget) if config.reward_model != "none" else Scorer(*budget)
    )
    metrics: dict[str, float] = {"num-examples": len(session.data.feedback)}
    for prefix, names, rate in passes:
        with only_trainable(session.model, names) if names is not None else nullcontext():
            stats = update(
                session.model,
                session.tokenizer,
                list(session.data.feedback),
                scorer,
                replace(feedback, learning_rate=rate),
                rng,
            )
        metrics.update({f"{prefix}-{k}": v for k, v in {**stats, "learning-rate": rate}.items()})
    metrics["train-ratings-used"] = float(scorer.used)
    if isinstance(scorer, LearnedScorer):
        metrics.update(reward_models.finish(session, scorer))
    return metrics


def feedback_passes(session: UserSession) -> list[tuple[str, frozenset[str] | None, float]]:
    """The feedback update's passes: (figure prefix, parameters trained or None for all, rate)."""
    return passes_of(session.config, session.personal_names, session.shared_names)


def passes_of(
    config: RunConfig, personal_names: frozenset[str], shared_names: frozenset[str]
) -> list[tuple[str, frozenset[str] | None, float]]:
    """:func:`feedback_passes` for a model whose parameters split into these personal and shared ones."""
    if not (personal_names and shared_names):  # none, or local-only: one pass
        return [("train", None, config.feedback_learning_rate)]
    if config.personal_epochs == 0 and config.personalization not in FEEDBACK_ONLY:  # jointly, as in SFT
        return [("train", None, config.feedback_learning_rate)]
    personal_pass = (personal_names, config.personal_feedback_learning_rate)
    if config.feedback_learning_rate == 0:  # the personal pass is the round's whole update
        return [("train", *personal_pass)]
    return [("personal", *personal_pass), ("train", shared_names, config.feedback_learning_rate)]


def bandit_feedback(session: UserSession, feedback: FeedbackConfig) -> dict[str, float]:
    """``code-bandit``'s feedback round: the shared model stays as it is; each judgement the
    user gives rates the model's summary of one of its feedback documents written for the code
    Thompson sampling picks (:mod:`~flhf_core.learning.code_bandit`). The round's judgements:
    ``ratings-per-round``, or when unlimited as many as an algorithm's round samples
    (``feedback-steps`` x ``feedback-prompts`` x ``samples-per-prompt``). A request the user
    declines to rate costs nothing, as for the algorithms."""
    config = session.config
    every = all_codes(config.aspects)
    state = bandit_of(session.model)
    bandit = state.bandit()
    rng = np.random.default_rng(round_seed(session, 2))
    asks = (
        config.ratings_per_round or feedback.steps * feedback.prompts_per_step * feedback.samples_per_prompt
    )
    documents = list(session.data.feedback)
    written: dict[tuple[str, int], str] = {}  # greedy summaries: one per (document, code)
    ratings: list[float] = []
    for _ in range(4 * asks):  # declined requests cost nothing; a user who rates rarely is asked at most 4x
        if len(ratings) == asks:
            break
        arm = bandit.choose(rng)
        example = documents[int(rng.integers(len(documents)))]
        if (example.doc_id, arm) not in written:
            (written[(example.doc_id, arm)],) = summarize(
                session.model,
                session.tokenizer,
                [replace(example, instruction=every[arm].prompt).source],
                config,
            )
        utility = judge(session.profile, written[(example.doc_id, arm)], example.summary).utility
        rating = score(session.profile, utility, rng)
        if rating is None:
            continue
        bandit.update(arm, rating)
        ratings.append(rating)
    state.store(bandit)
    return {
        "num-examples": len(documents),
        # its ratings' mean, exploration included; not "reward", which is the updated model's
        # true utility on the reward documents (the handler's, as for every algorithm)
        "train-ratings-mean": float(np.mean(ratings)) if ratings else 0.0,
        "train-ratings-used": float(len(ratings)),
    }  # (which code the bandit serves stays on the device: it names what the user wants)
