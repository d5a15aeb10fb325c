"""bench/personalize.py's figures: pure functions of the users' figures per (method, seed).

A method's *users* at one seed: user id -> ``reward`` (mean true utility on the user's held-out
documents), ``content`` and ``length`` factors, its preference ``group`` (the code that best
expresses what it wants: users of one group share aspect-or-mix and length bucket), whether
it ``has-keywords`` (a preference no code names) and, for learned rows, the ``digests`` of its
summaries by document (equal digests: the same text). Every figure below compares methods on
the seeds they share, paired by (seed, user), with :mod:`flhf_core.results.statistics`'s rule:
a row beats another only when the paired difference's 95% interval lies above zero, and a
ratio target is met only when the ratio of means reaches it *and* the interval is above zero.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from flhf_core.results.statistics import Interval, paired_interval

Users = dict[str, dict[str, Any]]  # user id -> its figures
Methods = dict[str, dict[int, Users]]  # method -> seed -> users
SHARED = ("fedavg-sft", "best-shared-code")  # the shared baseline is the better of these
FACTORS = ("reward", "content", "length")


def matrix(
    per_seed: dict[int, Users], seeds: list[int], key: str = "reward", users: list[str] | None = None
) -> np.ndarray:
    """(seeds x users) of one figure; ``users`` in this order (default: those of every seed)."""
    if users is None:
        users = sorted(set.intersection(*(set(per_seed[s]) for s in seeds)), key=int)
    return np.array([[per_seed[s][u][key] for u in users] for s in seeds], dtype=float)


def common_seeds(methods: Methods, *names: str) -> list[int]:
    present = [set(methods[n]) for n in names if n in methods]
    if len(present) < len(names):
        return []
    return sorted(set.intersection(*present))


def common_users(methods: Methods, names: tuple[str, ...], seeds: list[int]) -> list[str]:
    """The users every one of ``names`` has at every one of ``seeds`` (a user missing from one
    run's final evaluation is left out of its comparisons, never misaligned)."""
    users = set.intersection(*(set(methods[n][s]) for n in names for s in seeds))
    return sorted(users, key=int)


def pair(
    methods: Methods, mine: str, reference: str, seeds: list[int], key: str = "reward"
) -> tuple[np.ndarray, np.ndarray]:
    """(seeds x users) of ``key`` for two methods on their shared users, aligned."""
    users = common_users(methods, (mine, reference), seeds)
    return matrix(methods[mine], seeds, key, users), matrix(methods[reference], seeds, key, users)


def shared_baseline(methods: Methods, seeds: list[int]) -> str | None:
    """The better (higher mean reward over ``seeds``) of ``fedavg-sft`` and ``best-shared-code``."""
    candidates = [m for m in SHARED if seeds and set(seeds) <= set(methods.get(m, {}))]
    if not candidates:
        return None
    return max(candidates, key=lambda m: matrix(methods[m], seeds).mean())


def identical_share(users: Users) -> float | None:
    """Of the (document, two users of different groups) pairs, the share where both users got
    the same summary; None without digests."""
    with_digests = {u: f for u, f in users.items() if f.get("digests")}
    same = pairs = 0
    for a, b in combinations(sorted(with_digests, key=int), 2):
        if with_digests[a]["group"] == with_digests[b]["group"]:
            continue
        mine, theirs = with_digests[a]["digests"], with_digests[b]["digests"]
        for doc in mine.keys() & theirs.keys():
            pairs += 1
            same += mine[doc] == theirs[doc]
    return same / pairs if pairs else None


def against(mine: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """A paired comparison: the interval, its half-width (the smallest detectable difference)
    and the ratio of means."""
    interval: Interval = paired_interval(mine - reference)
    return {
        **interval.to_json(),
        "half-width": interval.half_width,
        "ratio": float(mine.mean() / reference.mean()) if reference.mean() > 0 else None,
    }


def row_figures(methods: Methods) -> dict[str, dict[str, Any]]:
    """Every method's figures: reward, worst user (mean over seeds, then the minimum), content
    and length factors, ``gap-closed`` = (U - U_shared) / (U_oracle - U_shared), paired
    comparisons with the shared baseline and ``local-only``, the share of users served at least
    as well as by the shared baseline, and the share of identical summaries across groups."""
    figures: dict[str, dict[str, Any]] = {}
    for method, per_seed in methods.items():
        seeds = sorted(per_seed)
        entry: dict[str, Any] = {"seeds": seeds}
        for factor in FACTORS:
            values = matrix(per_seed, seeds, factor)
            entry[factor if factor == "reward" else f"reward-{factor}"] = float(values.mean())
        entry["reward-worst"] = float(matrix(per_seed, seeds).mean(axis=0).min())
        shares = [identical_share(per_seed[s]) for s in seeds]
        if any(share is not None for share in shares):
            entry["identical-across-groups"] = float(np.mean([s for s in shares if s is not None]))
        everywhere = set.intersection(*(set(per_seed[s]) for s in seeds))
        keyed = [u for u, f in per_seed[seeds[0]].items() if f.get("has-keywords") and u in everywhere]
        if keyed:
            entry["reward-keyword-users"] = float(
                matrix(per_seed, seeds, users=sorted(keyed, key=int)).mean()
            )
        paired = common_seeds(methods, method, "oracle")
        baseline = shared_baseline(methods, paired)
        if baseline is not None:
            users = common_users(methods, (method, baseline, "oracle"), paired)
            own, shared, oracle = (
                matrix(methods[m], paired, users=users) for m in (method, baseline, "oracle")
            )
            gap = oracle.mean() - shared.mean()
            entry["shared-baseline"] = baseline
            entry["gap-closed"] = float((own.mean() - shared.mean()) / gap) if gap > 0 else None
            entry["worst-ratio-to-shared"] = float(own.mean(axis=0).min() / shared.mean(axis=0).min())
            entry["users-at-least-shared"] = float(np.mean(own.mean(axis=0) >= shared.mean(axis=0)))
            if method != baseline:
                entry["vs-shared"] = against(own, shared)
        local = common_seeds(methods, method, "local-only")
        if local and method != "local-only":
            entry["vs-local-only"] = against(*pair(methods, method, "local-only", local))
        figures[method] = entry
    return figures


def paired(methods: Methods, method: str, reference: str, key: str = "reward") -> dict[str, Any] | None:
    """``method`` against ``reference`` on the seeds both have, paired by (seed, user), on ``key``
    (the reward, or one of its factors)."""
    seeds = common_seeds(methods, method, reference)
    if not seeds:
        return None
    return {"seeds": seeds, **against(*pair(methods, method, reference, seeds, key))}


def met(comparison: dict[str, Any] | None, ratio: float) -> bool | None:
    """A ratio target: the ratio of means reaches ``ratio`` and the interval lies above zero."""
    if comparison is None or comparison["ratio"] is None:
        return None
    return comparison["ratio"] >= ratio and comparison["low"] > 0


def targets(
    methods: Methods,
    figures: dict[str, dict[str, Any]],
    best: str | None,
    scores: dict[str, dict[int, float]] | None = None,
) -> list[dict[str, Any]]:
    """The personalization targets for the best FLHF row ``best`` (each: its figure, the
    threshold, whether it is met, on how many seeds, and ``rule``: ``ratio`` (reached and the
    paired interval above zero), ``interval`` (above zero) or ``point`` (the estimate alone,
    where no interval is taken: a worst user, a share of users, gap-closed)). ``scores``: the
    rows' reward-document scores, which pick among the rows at a budget."""
    if best is None or best not in figures or "shared-baseline" not in figures[best]:
        return []
    row = figures[best]
    found: list[dict[str, Any]] = []

    def check(
        name: str, value: Any, threshold: Any, is_met: bool | None, seeds: list[int], rule: str, **more: Any
    ) -> None:
        found.append(
            {
                "target": name,
                "value": value,
                "threshold": threshold,
                "met": is_met,
                "seeds": len(seeds),
                "rule": rule,
                **more,
            }
        )

    shared = paired(methods, best, row["shared-baseline"])
    check(
        "mean reward / shared baseline",
        shared["ratio"],
        1.5,
        met(shared, 1.5),
        shared["seeds"],
        "ratio",
        interval=shared,
    )
    worst = row["worst-ratio-to-shared"]
    check("worst user / shared baseline's worst", worst, 2.0, worst >= 2.0, shared["seeds"], "point")
    local = paired(methods, best, "local-only")
    if local:
        check(
            "mean reward / local-only",
            local["ratio"],
            1.2,
            met(local, 1.2),
            local["seeds"],
            "ratio",
            interval=local,
        )
    rule = paired(methods, best, "first-L-words")
    if rule:
        worst_rule = figures["first-L-words"]["reward-worst"]
        check(
            "above first-L-words (mean)",
            rule["mean"],
            0.0,
            rule["low"] > 0,
            rule["seeds"],
            "interval",
            interval=rule,
        )
        check(
            "above first-L-words (worst user)",
            row["reward-worst"] - worst_rule,
            0.0,
            row["reward-worst"] > worst_rule,
            rule["seeds"],
            "point",
        )
    gap = row.get("gap-closed")
    check(
        "gap-closed (unlimited feedback)",
        gap,
        0.7,
        None if gap is None else gap >= 0.7,
        row["seeds"],
        "point",
    )
    at_32 = [m for m in figures if m.endswith("@32") and figures[m].get("gap-closed") is not None]
    chosen = [m for m in at_32 if scores and m in scores]
    if chosen:  # the @32 row the users' reward documents prefer, never the held-out figure
        top = max(chosen, key=lambda m: np.mean(list(scores[m].values())))
        closed = figures[top]["gap-closed"]
        check(
            f"gap-closed at 32 judgements ({top})", closed, 0.5, closed >= 0.5, figures[top]["seeds"], "point"
        )
    share = row["users-at-least-shared"]
    check(
        "users served at least as well as by the shared baseline",
        share,
        0.9,
        share >= 0.9,
        shared["seeds"],
        "point",
    )
    identical = row.get("identical-across-groups")
    if identical is not None:
        check("identical summaries across groups", identical, 0.1, identical <= 0.1, row["seeds"], "point")
    sft = paired(methods, best, "fedavg-sft", "content")
    if sft:
        check(
            "content factor rises over fedavg-sft",
            sft["mean"],
            0.0,
            sft["low"] > 0,
            sft["seeds"],
            "interval",
            interval=sft,
        )
    bandit = paired(methods, best, "code-bandit")
    if bandit:
        check(
            "learned conditioning >= code-bandit (mean)",
            bandit["mean"],
            0.0,
            bandit["mean"] >= 0,
            bandit["seeds"],
            "point",
            interval=bandit,
        )
        keyed = keyword_users(methods, best)
        if keyed:
            on_keywords = paired(methods_on(methods, keyed), best, "code-bandit")
            check(
                "ahead of code-bandit where keywords matter",
                on_keywords["mean"],
                0.0,
                on_keywords["low"] > 0,
                on_keywords["seeds"],
                "interval",
                interval=on_keywords,
            )
    return found


def keyword_users(methods: Methods, method: str) -> list[str]:
    first = methods[method][min(methods[method])]
    return sorted((u for u, f in first.items() if f.get("has-keywords")), key=int)


def methods_on(methods: Methods, users: list[str]) -> Methods:
    """``methods`` restricted to ``users``."""
    return {
        m: {s: {u: f[u] for u in users if u in f} for s, f in per_seed.items()}
        for m, per_seed in methods.items()
    }
