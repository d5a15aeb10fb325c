"""How a user sees a model: its summaries, the user's judgements of them, and the
figures a reply reports (the received model's evaluation, the rewards before and after a
local update). The measuring half of :mod:`flhf_core.client.handlers`.

Two sets of documents are ever judged, and never mixed: the user's fresh reward documents,
whose reward steers aggregation (train replies), and the held-out documents, whose reward is
only reported (evaluations).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from flwr.app import ConfigRecord
from transformers import PreTrainedModel

from flhf_core.client.session import UserSession, initial_model
from flhf_core.data.corpus import Example
from flhf_core.learning.generate import summarize
from flhf_core.learning.metrics import evaluate_model
from flhf_core.protocol import (
    EVALUATE_RECEIVED,
    JUDGED_CONTENT,
    JUDGED_LENGTH,
    JUDGED_UTILITY,
    SUMMARY_DIGEST,
)
from flhf_core.users.feedback import Judgement, judge, preference_probability


def state_metrics(session: UserSession) -> dict[str, float]:
    """Where the personal parameters came from this round (1.0 = restored from that source)."""
    if not session.personal_names:
        return {}
    return {
        "state-from-context": float(session.restored.source == "context"),
        "state-from-file": float(session.restored.source == "file"),
        "state-unreadable": float(bool(session.restored.problem)),
    }


def summaries(
    session: UserSession, model: PreTrainedModel, *example_sets: Sequence[Example]
) -> list[list[str]]:
    """``model``'s greedy summaries of several sets of examples, decoded in one pass."""
    sources = [e.source for examples in example_sets for e in examples]
    decoded = summarize(model, session.tokenizer, sources, session.config)
    out, start = [], 0
    for examples in example_sets:
        out.append(decoded[start : start + len(examples)])
        start += len(examples)
    return out


def judgements_of(session: UserSession, texts: list[str], documents: Sequence[Example]) -> list[Judgement]:
    """The user's true judgement of summaries of ``documents``."""
    return [judge(session.profile, t, e.summary) for t, e in zip(texts, documents, strict=True)]


def user_judgements(
    session: UserSession, model: PreTrainedModel, documents: Sequence[Example]
) -> list[Judgement]:
    (texts,) = summaries(session, model, documents)
    return judgements_of(session, texts, documents)


def own_model_judgements(session: UserSession, documents: Sequence[Example]) -> list[Judgement]:
    """The user's judgements of its own model (with its personal state), asked as the user asks it."""
    return user_judgements(session, session.model, session.as_asked(documents))


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


def judged_lists(judgements: list[Judgement], texts: list[str], suffix: str = "") -> dict[str, list]:
    """Each held-out document's utility, content and length factors and the summary's digest
    (:func:`summary_digest`), in the report's order (lists ride in a MetricRecord; the server
    keeps them out of the averaged rows)."""
    return {
        f"{JUDGED_UTILITY}{suffix}": [float(j.utility) for j in judgements],
        f"{JUDGED_CONTENT}{suffix}": [float(j.content) for j in judgements],
        f"{JUDGED_LENGTH}{suffix}": [float(j.length) for j in judgements],
        f"{SUMMARY_DIGEST}{suffix}": [summary_digest(t) for t in texts],
    }


def summary_digest(text: str) -> int:
    """The first 52 bits of the text's SHA-256: equal for equal texts, exact as a float.

    The held-out evaluation is the experiment's instrument, not a deployment's: like the true
    utilities beside it, a digest tells something about the user to a server that can write the
    same text itself (one that holds the global model and the documents can recognize which
    control code a user's summary answered). A deployment without simulated users has no
    held-out judgements to report."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:13], 16)


def text_metrics(judgements: list[Judgement]) -> dict[str, float]:
    """Output length and repetition of the judged summaries (reward-hacking diagnostics)."""
    return {
        "output-words": float(np.mean([j.words for j in judgements])),
        "repetition": float(np.mean([j.repetition for j in judgements])),
    }


ROUND0_RECORD = "round0-utilities"


# The round-0 model's greedy summaries, by source text: the same for every user this process
# serves (held-out documents are prompted neutrally), so each is decoded once per process.
_round0_summaries: dict[tuple, str] = {}


def round0_utilities(session: UserSession) -> list[float]:
    """The user's utilities of the round-0 model's summaries (the win-rate baseline).

    The round-0 model is rebuilt from the seed (or the pretrained checkpoint), so its
    summaries never change: they are decoded once per process, judged once per user and
    kept in Context.state.
    """
    report = session.data.report
    doc_ids = [e.doc_id for e in report]
    cached = session.context.state.config_records.get(ROUND0_RECORD)
    if cached is not None and list(cached["doc-ids"]) == doc_ids:
        return list(cached["utilities"])
    config = session.config
    model_key = (
        config.model,
        config.tiny_t5_size,
        config.seed,
        len(session.tokenizer),
        config.max_new_tokens,
    )
    missing = [e for e in report if (*model_key, e.source) not in _round0_summaries]
    if missing:
        initial = initial_model(session.context, config, session.tokenizer)
        initial.to(next(session.model.parameters()).device)
        (texts,) = summaries(session, initial, missing)
        _round0_summaries.update({(*model_key, e.source): t for e, t in zip(missing, texts, strict=True)})
    texts = [_round0_summaries[(*model_key, e.source)] for e in report]
    utilities = [j.utility for j in judgements_of(session, texts, report)]
    session.context.state[ROUND0_RECORD] = ConfigRecord({"doc-ids": doc_ids, "utilities": utilities})
    return utilities


def evaluation_metrics(
    session: UserSession, also_judge: Sequence[Example] = ()
) -> tuple[dict[str, float], list[Judgement] | None]:
    """The received global model on the user's data, as the user sees it.

    Loss, perplexity and ROUGE on the validation examples (if the user has any); the user's reward on the
    held-out documents (reported, never used for training or weighting); and the win rate
    against the round-0 model: the Bradley-Terry probability, under the user's true
    utility, that the user prefers the global model's summary of a document to the round-0
    model's, averaged over documents. With personal parameters, the same figures for the
    user's personalized model (``-personal``). Under ``local-head`` there is no global
    model to evaluate (the head exists only on the clients): personal figures only. Under
    ``mode = local-only`` the user's own model is the only one: its figures are reported
    unprefixed, as a global model's would be.

    Beside the means, the per-document utilities and contents (ROUGE-L F1 against the
    user's aspect) ride along as lists (``judged-utility``, ``judged-content``, and
    ``-personal``): the server writes them to ``judgements.json``, so that two runs' models
    can be compared document by document (``bench/quality.py``'s win rate).

    ``also_judge``: documents on which the user's own model (the received one, with its
    personal parameters) is judged in the same generation pass; their judgements are
    returned beside the metrics (the train handler's ``reward-before``).
    """
    config = session.config
    examples = session.data.validation[: config.eval_max_examples or None]
    report = session.data.report
    if not report:
        raise ValueError(f"user {session.user} has no held-out documents to be evaluated on")
    # A user without validation examples (many users, few documents) still reports its reward
    metrics: dict[str, float] = {"num-examples": len(examples) or len(report), **state_metrics(session)}
    also: list[str] = []  # the user's own model's summaries of also_judge
    local_only = config.mode == "local-only"  # the user's own model is the only one: report it as "the model"
    if config.has_global_model or local_only:
        global_model = session.model if local_only else session.global_view()
        if global_model is session.model:  # no personal parameters: one pass for everything
            val_texts, report_texts, also = summaries(session, global_model, examples, report, also_judge)
        else:
            val_texts, report_texts = summaries(session, global_model, examples, report)
        judgements = judgements_of(session, report_texts, report)
        win_rate = np.mean(
            [
                preference_probability(session.profile, new.utility, old)
                for new, old in zip(judgements, round0_utilities(session), strict=True)
            ]
        )
        if examples:
            metrics.update(evaluate_model(global_model, session.tokenizer, examples, config, val_texts))
        metrics.update(reward_metrics(judgements))
        metrics.update(judged_lists(judgements, report_texts))
        metrics.update(text_metrics(judgements))
        metrics["win-rate"] = float(win_rate)
    if session.personal_names and not local_only:  # the user's personalized model, on the same data
        val_texts, report_texts, also = summaries(
            session, session.model, examples, session.as_asked(report), session.as_asked(also_judge)
        )
        if examples:
            personalized = evaluate_model(session.model, session.tokenizer, examples, config, val_texts)
            metrics.update({f"{k}-personal": v for k, v in personalized.items()})
        personal_judgements = judgements_of(session, report_texts, report)
        metrics.update(reward_metrics(personal_judgements, "reward-personal"))
        metrics.update(judged_lists(personal_judgements, report_texts, "-personal"))
        if "reward" in metrics:
            metrics["personalization-gain"] = metrics["reward-personal"] - metrics["reward"]
    return metrics, (judgements_of(session, also, also_judge) if also_judge else None)


def judge_received(session: UserSession) -> tuple[dict[str, float] | None, list[Judgement]]:
    """Before a local update: the received model's evaluation, when the server asks for it
    (``evaluate-received``; else None), and the user's judgements of the user's own model (the
    received one, with its personal parameters) on the fresh reward documents."""
    evaluation, before = None, None
    if bool(session.server_config.get(EVALUATE_RECEIVED, False)):
        evaluation, before = evaluation_metrics(session, also_judge=session.data.reward)
    if before is None:
        before = own_model_judgements(session, session.data.reward)
    return evaluation, before


def judge_update(session: UserSession, before: list[Judgement]) -> dict[str, float]:
    """After a local update: the user's reward of the updated model on the same fresh documents
    (``reward``, which may steer aggregation), against the received one's (``reward-before``)."""
    after = own_model_judgements(session, session.data.reward)
    metrics = {**reward_metrics(before, "reward-before"), **reward_metrics(after)}
    metrics["reward-gain"] = metrics["reward"] - metrics["reward-before"]
    return {**metrics, **text_metrics(after), **state_metrics(session)}
