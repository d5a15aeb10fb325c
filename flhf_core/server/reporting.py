"""What a run reports: per-user rows, the federation's figures per round, and its summary.

Pure functions over metric dictionaries, so they are tested without Flower. The reward
reported here is always the users' reward on the server's held-out documents (evaluate
replies); the reward that steers aggregation, on each user's own fresh documents, appears
as ``train-reward`` and is never summarized as the run's result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flhf_core.results.rounds import RoundReport, rejection_counts
from flhf_core.results.tracking import Tracker


def user_spread(user_metrics: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Fairness across users: mean (and factors), worst, best and spread of the global model's reward."""
    rewards = [m["reward"] for m in user_metrics.values() if "reward" in m]
    if not rewards:
        return personal_spread(user_metrics)
    win_rates = [m["win-rate"] for m in user_metrics.values() if "win-rate" in m]
    components = {
        key: float(np.mean([m[key] for m in user_metrics.values() if key in m]))
        for key in ("reward-content", "reward-length", "reward-keywords")
        if any(key in m for m in user_metrics.values())
    }
    return {
        "reward": float(np.mean(rewards)),
        **components,
        "reward-worst": float(np.min(rewards)),
        "reward-best": float(np.max(rewards)),
        "reward-std": float(np.std(rewards)),
        **({"win-rate": float(np.mean(win_rates))} if win_rates else {}),
        **personal_spread(user_metrics),
    }


def personal_spread(user_metrics: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Personalized models: mean and worst-user reward, and the gain over the global model."""
    personal = [m for m in user_metrics.values() if "reward-personal" in m]
    if not personal:
        return {}
    spread = {
        "reward-personal": float(np.mean([m["reward-personal"] for m in personal])),
        "reward-personal-worst": float(np.min([m["reward-personal"] for m in personal])),
    }
    gains = [m["personalization-gain"] for m in personal if "personalization-gain" in m]
    if gains:  # none under local-head: there is no global model to gain over
        spread["personalization-gain"] = float(np.mean(gains))
        spread["personalization-gain-worst"] = float(np.min(gains))
        spread["users-helped"] = float(np.mean([g > 0 for g in gains]))
    return spread


def train_columns(metrics: Mapping[str, float]) -> dict[str, float]:
    """A training reply's metrics as metrics.jsonl columns (prefixed ``train-``, except the
    learned reward model's ``reward-model-*`` diagnostics, measured only in training)."""
    return {
        "train-examples"
        if k == "num-examples"
        else k
        if k.startswith(("train-", "reward-model-"))
        else f"train-{k}": v
        for k, v in metrics.items()
    }


def eval_columns(metrics: Mapping[str, float]) -> dict[str, float]:
    """An evaluation reply's metrics as columns (``num-examples`` becomes ``eval-examples``)."""
    return {"eval-examples" if k == "num-examples" else k: v for k, v in metrics.items()}


def record_users(
    tracker: Tracker, server_round: int, phase: str, train: RoundReport, evaluation: RoundReport
) -> None:
    """One row per user: its training figures and its validation figures."""
    for user in sorted(train.user_metrics.keys() | evaluation.user_metrics.keys()):
        row = train_columns(train.user_metrics.get(user, {}))
        row.update(eval_columns(evaluation.user_metrics.get(user, {})))
        if user in train.weights:
            row["aggregation-weight"] = train.weights[user]
        tracker.log(server_round, phase, "client", user, row)
    for rejection in train.rejected + evaluation.rejected:
        tracker.log(
            server_round,
            phase,
            "client",
            rejection.user_id,
            {"failed": 1, "node-id": rejection.node_id, "code": rejection.code, "reason": rejection.reason},
        )


def users_evaluated(row: Mapping[str, Any]) -> bool:
    """Whether a server row holds the users' evaluation of its round's model (the global one's
    ``reward``, or only ``reward-personal`` where there is no global model)."""
    return "reward" in row or "reward-personal" in row


def reward_summary(server_rows: list[dict], sft_rounds: int) -> dict[str, float]:
    """The users' reward at the end (on held-out documents), and when the supervised rounds ended:
    each from the last round the users evaluated (a round without evaluation has no reward)."""
    evaluated = [r for r in server_rows if users_evaluated(r)]
    if not evaluated:
        return {}
    final = evaluated[-1]
    keys = (
        "reward",
        "reward-worst",
        "reward-std",
        "win-rate",
        "reward-personal",
        "reward-personal-worst",
        "personalization-gain",
        "personalization-gain-worst",
        "users-helped",
    )
    summary = {key: final[key] for key in keys if key in final}
    supervised = [r for r in evaluated if r["phase"] == "sft" and r["round"] <= sft_rounds and "reward" in r]
    if supervised and supervised[-1] is not final and "reward" in final:
        summary["reward-after-sft"] = supervised[-1]["reward"]
        summary["reward-after-sft-round"] = supervised[-1]["round"]  # the last evaluated supervised round
        summary["reward-worst-after-sft"] = supervised[-1].get("reward-worst")
        summary["reward-gain-from-feedback"] = final["reward"] - supervised[-1]["reward"]
    return summary


def run_summary(
    rows: list[dict[str, Any]],
    config: Mapping[str, Any],
    baselines: Mapping[str, float],
    initial: Mapping[str, float],
) -> dict[str, Any]:
    """summary.json's figures from the rows of metrics.jsonl (``config`` in kebab-case).

    The model's figures are the last evaluated round's (``evaluated-round``); when the last
    round the run completed was not evaluated (a failure, or ``evaluate-every``), the summary
    says so (``note``) instead of failing."""
    server_rows = [r for r in rows if r["scope"] == "server" and r["round"] > 0]
    evaluated = [r for r in server_rows if r.get("rougeL") is not None or users_evaluated(r)]
    final = evaluated[-1] if evaluated else {}
    lead_key = f"baseline-lead{config['lead-words']}-rougeL"
    summary: dict[str, Any] = {
        "rounds": len(server_rows),
        "evaluated-round": final.get("round"),
        **{key: final.get(key) for key in ("rougeL", "rouge1", "rouge2", "loss", "perplexity")},
    }
    if server_rows and final.get("round") != server_rows[-1]["round"]:
        summary["note"] = (
            f"round {server_rows[-1]['round']}'s model was not evaluated; the figures are of "
            + (f"round {final['round']}'s" if final else "no round's")
        )
    if "rougeL" in initial:  # not under local-head: there is no global model to evaluate
        summary["rougeL-round0"] = initial["rougeL"]
        if final.get("rougeL") is not None:
            summary["rougeL-vs-round0"] = final["rougeL"] / max(initial["rougeL"], 1e-9)
            summary["rougeL-minus-lead-baseline"] = final["rougeL"] - baselines[lead_key]
    summary.update(
        {k: v for k, v in final.items() if k.startswith("rougeL-") and v is not None}
    )  # per aspect
    summary.update(baselines)
    summary.update(
        {
            "failures": sum(r.get("failures", 0) for r in server_rows),
            **{
                key: sum(r.get(key, 0) for r in server_rows)
                for key in rejection_counts([])  # every code, counted over the rounds
            },
            "bytes-up": sum(r.get("bytes-up", 0) for r in server_rows),
            "bytes-down": sum(r.get("bytes-down", 0) for r in server_rows),
            "seconds": sum(r.get("seconds", 0.0) for r in server_rows),
            "train-tokens-per-second": server_rows[-1].get("train-tokens-per-second")
            if server_rows
            else None,
            **reward_summary(server_rows, int(config["sft-rounds"])),
        }
    )
    return summary


def client_seconds(report: RoundReport) -> dict[str, float]:
    """Where the users' time went in a phase, summed over its replies.

    ``client-train-seconds``: the local updates; ``client-eval-seconds``: everything the
    users generated, judged or evaluated; ``setup-seconds``: building tokenizer, model and
    data before the work (cheap once a worker process or node has its caches).
    """
    users = report.user_metrics.values()
    return {
        "client-train-seconds": sum(m.get("train-seconds", 0.0) for m in users),
        "client-eval-seconds": sum(m.get("eval-seconds", 0.0) for m in users),
        "setup-seconds": sum(m.get("setup-seconds", 0.0) for m in users),
    }


def add_seconds(row: dict[str, float], extra: Mapping[str, float]) -> None:
    for key, value in extra.items():
        row[key] = row.get(key, 0.0) + value


def update_share(row: Mapping[str, float]) -> float | None:
    """The share of the users' summed time that went to the local update."""
    total = (
        row.get("client-train-seconds", 0.0)
        + row.get("client-eval-seconds", 0.0)
        + row.get("setup-seconds", 0.0)
    )
    return row["client-train-seconds"] / total if total > 0 else None


def round_line(
    server_round: int,
    rounds: int,
    phase: str,
    row: Mapping[str, float],
    eta: float,
    evaluated: tuple[int, Mapping[str, float]] | None = None,
) -> str:
    """The per-round log line: held-out figures (where evaluated), users, time, update share, ETA.

    The users' reward of a round's model arrives with the next round's replies: ``evaluated``
    is the latest round whose users' figures came in, and those figures.
    """
    parts = [f"round {server_round}/{rounds} [{phase}]"]
    if "rougeL" in row:
        parts.append(f"held-out rougeL {row['rougeL']:.2f} loss {row['loss']:.3f}")
    if evaluated is not None and "reward" in evaluated[1]:
        of, figures = evaluated
        model = "" if of == server_round else f" of round {of}'s model"
        parts.append(f"users' reward{model} {figures['reward']:.3f} (worst {figures['reward-worst']:.3f})")
        if "reward-personal" in figures:
            parts.append(f"personal reward {figures['reward-personal']:.3f}")
    parts.append(f"clients {row['clients']}, failures {row['failures']}")
    share = update_share(row)
    timing = f"{row['seconds']:.1f}s" + (
        f" ({share:.0%} of client time in local updates)" if share is not None else ""
    )
    parts.append(f"{timing}, ETA {eta:.0f}s")
    return " | ".join(parts)
