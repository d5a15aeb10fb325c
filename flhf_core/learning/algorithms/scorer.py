"""Who scores the samples: the user, within a feedback budget (issue 13).

The feedback algorithms never ask the user directly; they ask a :class:`Scorer` for ratings
(best-of-n, REINFORCE, PPO: :meth:`Scorer.rate`) or for choices between two samples of a
document (DPO: :meth:`Scorer.choose`). So true-reward runs and budgeted (or, later,
learned-reward) runs share one code path.

**The budget** ``B = ratings-per-round`` is the number of judgements the user gives in one
feedback round; a rating and a pairwise choice count alike; ``B = 0`` is unlimited (the user
judges every sample, today's simulation). It is spread evenly over the round's S steps, each
step using its share plus whatever earlier steps left unused, in whole documents' worth of
samples for ratings (see :meth:`Scorer._allowance`). A request the user declines (a profile's
``rating_rate`` < 1) costs nothing.

**Which samples** the user judges (``uniform``): the documents of a step in random order, and
every sample of a document before the next one, so that a document's samples are rated
together (a leave-one-out baseline and a best-of-n choice need several ratings of the same
document); for DPO, its pairs in random order. Samples the user did not judge are unrated:
they get no advantage, best-of-n never picks them, DPO skips unanswered pairs.

``used`` counts the judgements given; the client reports it as ``train-ratings-used``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from flhf_core.data.corpus import Example
from flhf_core.learning import reward_model as rm
from flhf_core.learning.algorithms.rollout import Rollout, RolloutFeedback
from flhf_core.users.feedback import UserProfile, judge, judging_profile, prefers_first, score


def model_gpus(model: torch.nn.Module) -> list[int]:
    """The GPU ``model`` is on, as :func:`torch.random.fork_rng` takes it (none on CPU: forking
    every visible GPU's generator would start CUDA in a CPU run)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


class Scorer:
    """The simulated user as the feedback algorithms see it, within ``budget`` judgements per
    round of ``steps`` steps (``budget = 0``: unlimited).

    ``profile`` is the client's user; a pooled example (``mode = centralized``) is judged by
    the user it came from (:func:`~flhf_core.users.feedback.judging_profile`).
    """

    def __init__(self, profile: UserProfile, budget: int = 0, steps: int = 1, group_size: int = 1) -> None:
        if budget < 0 or steps < 1 or group_size < 1:
            raise ValueError(f"budget {budget}, steps {steps}, group size {group_size}: out of range")
        self.profile = profile
        self.budget = budget
        self.steps = steps
        self.group_size = group_size  # samples per document, rated together
        self.step = 0
        self.used = 0

    # --- the budget ---------------------------------------------------------
    def _allowance(self, unit: int) -> int:
        """Judgements this step may still use (-1: unlimited), granted in whole ``unit``s (a
        document's samples, or one pair): ``unit * round((B // unit) (t+1) / S)`` by step t, the
        remainder ``B mod unit`` at the last step, less what earlier steps used. Advances the step."""
        t, self.step = self.step, self.step + 1
        if self.budget == 0:
            return -1
        done = min(t + 1, self.steps)
        granted = unit * round((self.budget // unit) * done / self.steps)
        if done == self.steps:
            granted = self.budget
        return max(granted - self.used, 0)

    # --- ratings ------------------------------------------------------------
    def rate(self, rollout: Rollout, rng: np.random.Generator) -> RolloutFeedback:
        """The user's ratings of the samples it is asked about this step (tensors on the
        rollout's device); ``utility`` is every sample's true utility, for diagnostics only."""
        allowance = self._allowance(self.group_size)
        users = [judging_profile(e, self.profile) for e in rollout.examples]
        utilities = [
            judge(u, t, e.summary).utility
            for u, t, e in zip(users, rollout.texts, rollout.examples, strict=True)
        ]
        scores, rated = [0.0] * len(utilities), [0.0] * len(utilities)
        for i in self._rating_order(rollout, rng, allowance):
            if allowance == 0:
                break
            rating = score(users[i], utilities[i], rng)
            if rating is None:
                continue
            scores[i], rated[i] = rating, 1.0
            self.used += 1
            allowance -= 1
        device = rollout.response_ids.device
        return RolloutFeedback(
            torch.tensor(scores, device=device),
            torch.tensor(rated, device=device),
            torch.tensor(utilities, device=device),
        )

    def _rating_order(self, rollout: Rollout, rng: np.random.Generator, allowance: int) -> list[int]:
        """Sample indices in the order the user is asked: every sample, in order, when
        unlimited; else documents in random order (or by :meth:`_uncertainty`, most uncertain
        first, when it has an opinion), each document's samples together."""
        count, size = len(rollout.examples), self.group_size
        if allowance < 0:
            return list(range(count))
        groups = [list(range(g, min(g + size, count))) for g in range(0, count, size)]
        rng.shuffle(groups)  # the samples of one prompt are contiguous (see rollout.sample)
        uncertainty = self._uncertainty(rollout.examples, rollout.texts, groups) if allowance else None
        if uncertainty is not None:  # a stable sort: equally uncertain documents stay shuffled
            order = sorted(range(len(groups)), key=lambda k: -uncertainty[k])
            groups = [groups[k] for k in order]
        return [i for group in groups for i in group]

    def _uncertainty(
        self, examples: list[Example], texts: list[str], groups: list[list[int]]
    ) -> list[float] | None:
        """How unsure the scorer is about each group of samples (None: no opinion, ask in
        random order). The user alone has none; see :class:`LearnedScorer`."""
        return None

    # --- pairwise choices ---------------------------------------------------
    def choose(
        self, texts: list[str], examples: list[Example], rng: np.random.Generator
    ) -> list[tuple[int, int]]:
        """(winner, loser) for the pairs (0, 1), (2, 3), ... the user answered this step; a
        pair is two samples of one document."""
        allowance = self._allowance(1)
        starts = list(range(0, len(texts) - 1, 2))
        if allowance >= 0:
            rng.shuffle(starts)
            pairs = [[a, a + 1] for a in starts]
            uncertainty = self._uncertainty(examples, texts, pairs) if allowance else None
            if uncertainty is not None:
                starts = [starts[k] for k in sorted(range(len(starts)), key=lambda k: -uncertainty[k])]
        pairs = []
        for a in starts:
            if allowance == 0:
                break
            b = a + 1
            user = judging_profile(examples[a], self.profile)
            if rng.random() >= user.rating_rate:
                continue
            utility_a = judge(user, texts[a], examples[a].summary).utility
            utility_b = judge(user, texts[b], examples[b].summary).utility
            pairs.append((a, b) if prefers_first(user, utility_a, utility_b, rng) else (b, a))
            self.used += 1
            allowance -= 1
        return sorted(pairs, key=min)


class LearnedScorer(Scorer):
    """The user within the budget, and a learned reward model for the documents the user did
    not judge.

    Each step: the user judges its share (as :class:`Scorer`); those judgements join the ones
    the user gave before (this round and earlier ones); when new ones arrived, the reward
    model takes ``fit_steps`` more steps on all of them (one AdamW optimizer per round,
    :func:`~flhf_core.learning.reward_model.fit`). Then it scores the samples of every document the user
    rated none of (a rating is sigmoid(r)), and decides every pair the user did not answer
    (the higher r wins; a tie is no pair). A document the user rated in part keeps the user's
    ratings alone: the model's calibration error must not become a leave-one-out advantage.
    Until the user has judged anything, the model knows nothing and scores nothing.

    **The gate** (``trust``, ``reward-model-trust``): before the model learns a step's new
    judgements, it is checked against them (the pairs they order: held out, and what the
    user really said); it scores for the user only while its agreement with the latest 32
    checked pairs (over at least 16) is at least ``trust`` with 95% confidence (the Wilson
    lower bound: :func:`~flhf_core.learning.reward_model.trusted`), decided again every step.
    Otherwise the unjudged samples stay unjudged, as without a reward model: a model no
    better than chance would steer the policy with confident but arbitrary rankings.
    ``trust = 0``: always. With ``active`` queries the checked pairs are the ones the model
    found hardest to tell apart, so its agreement understates its accuracy on the rest and
    the gate opens later.

    **Its own random streams** (``seed``): fitting the model draws from a generator of its own
    and leaves torch's as it found it, so a run with a reward model samples the same documents
    and summaries as the same run without one until the model first scores (a paired
    comparison: with the gate shut all round, the policy is the one ``reward-model = none``
    trains; before, the fits' draws shifted every later sample, and rows that differed only in
    their random streams differed by up to 0.04 in reward on one seed, BENCHMARKS).

    ``diagnostics``: over the samples the model scored this round (whether or not they were
    used), its ratings against the true utility (:func:`~flhf_core.learning.reward_model.diagnostics`);
    the gap only when it learned from ratings (pairs leave the scale of r free);
    ``reward-model-heldout-accuracy`` (its agreement with the latest checked pairs, what a real
    deployment can see) and ``reward-model-trusted`` (the share of the round's steps in which
    it scored for the user).

    ``active`` (``reward-queries = active``): once the model has learned something, the user
    is asked first about the documents whose samples the model can least tell apart, the
    smallest spread max r - min r of a document's samples (for DPO, the closest pair): where
    its ranking, which is all a leave-one-out advantage or a preference uses, is least
    reliable (uncertainty sampling; the pairwise form is the "closest pairs" of active
    preference learning). ``queried-spread`` and ``unqueried-spread`` (mean spreads of the
    documents the user judged and did not, over the steps that had judgements to give) show
    what it chose: the lower the first against the second, the more it concentrated the
    user's judgements where the model was unsure.
    """

    def __init__(
        self,
        profile: UserProfile,
        budget: int,
        steps: int,
        group_size: int,
        reward_model: rm.RewardModel,
        tokenizer: PreTrainedTokenizerBase,
        judgements: rm.Judgements,
        fit_steps: int,
        learning_rate: float,
        length_learning_rate: float,
        max_tokens: int,
        *,
        trust: float,
        active: bool = False,
        seed: int | Sequence[int] = 0,
    ) -> None:
        super().__init__(profile, budget, steps, group_size)
        # the reward model's own randomness (minibatches, dropout), apart from the caller's
        self._fit_rng = np.random.default_rng(seed)
        self.active = active
        self.trust = trust
        self.trusted_steps: list[bool] = []  # per step: did the model score for the user
        self.spreads: dict[str, list[float]] = {"queried": [], "unqueried": []}
        self._step_spreads: dict[tuple[int, ...], float] = {}  # this step's, by group
        self.reward_model = reward_model
        self.tokenizer = tokenizer
        self.judgements = judgements
        self.fit_steps = fit_steps
        self.max_tokens = max_tokens
        self.optimizer = rm.optimizer(reward_model, learning_rate, length_learning_rate)
        self._predicted: list[float] = []  # the model's ratings of samples the user did not judge
        self._utility: list[float] = []  # their true utilities (diagnostics only)
        self._groups: list[str] = []
        self.losses: dict[str, float] = {}

    def _check_and_learn(self, new: rm.Judgements) -> bool:
        """Check the model against the user's new judgements, then learn them; returns
        whether the model may score this step's unjudged samples (the gate)."""
        checks = self.judgements.checks + rm.agreement(
            self.reward_model, self.tokenizer, new.pairs(), self.max_tokens
        )
        self.judgements.checks = checks[-rm.TRUST_WINDOW :]  # all the gate reads
        self.judgements.rated += new.rated
        self.judgements.chosen += new.chosen
        if len(new):  # one optimizer per round: its moments carry over between steps
            fit_seed = int(self._fit_rng.integers(2**31))
            # dropout draws from torch's generator: give it back (the CPU's, and the model's GPU's)
            with torch.random.fork_rng(devices=model_gpus(self.reward_model)):
                torch.manual_seed(fit_seed)
                self.losses = rm.fit(
                    self.reward_model,
                    self.tokenizer,
                    self.judgements,
                    self.fit_steps,
                    self.optimizer,
                    self.max_tokens,
                    rng=np.random.default_rng(fit_seed),
                )
        trusted = bool(len(self.judgements)) and rm.trusted(self.judgements.checks, self.trust)
        self.trusted_steps.append(trusted)
        return trusted

    @torch.no_grad()
    def _ratings(self, documents: list[str], texts: list[str]) -> torch.Tensor:
        self.reward_model.eval()
        return torch.sigmoid(rm.scores(self.reward_model, self.tokenizer, documents, texts, self.max_tokens))

    @torch.no_grad()
    def _uncertainty(
        self, examples: list[Example], texts: list[str], groups: list[list[int]]
    ) -> list[float] | None:
        """Minus each group's spread of r (higher: less sure), when active and once the model
        has learned from something; the spreads are kept for ``queried-spread``."""
        if not self.active or not len(self.judgements):
            return None
        self.reward_model.eval()
        members = [i for group in groups for i in group]
        predicted = rm.scores(  # r, not sigmoid(r): its differences are the model's log-odds
            self.reward_model,
            self.tokenizer,
            [examples[i].document for i in members],
            [texts[i] for i in members],
            self.max_tokens,
        ).tolist()
        by_sample = dict(zip(members, predicted, strict=True))
        spreads = [max(by_sample[i] for i in g) - min(by_sample[i] for i in g) for g in groups]
        self._step_spreads = dict(zip(map(tuple, groups), spreads, strict=True))
        return [-spread for spread in spreads]

    def _record_spreads(self, judged: set[int]) -> None:
        """After a step: the spreads of the groups the user judged (some of) and did not."""
        for group, spread in self._step_spreads.items():
            self.spreads["queried" if judged & set(group) else "unqueried"].append(spread)
        self._step_spreads = {}

    def _note(self, predicted: list[float], utility: list[float], group: str) -> None:
        self._predicted += predicted
        self._utility += utility
        self._groups += [group] * len(predicted)

    def rate(self, rollout: Rollout, rng: np.random.Generator) -> RolloutFeedback:
        asked = super().rate(rollout, rng)
        judged = asked.rated.bool().tolist()
        self._record_spreads({i for i, was in enumerate(judged) if was})
        new = rm.Judgements(
            [
                (rollout.examples[i].document, rollout.texts[i], float(asked.scores[i]))
                for i, was in enumerate(judged)
                if was
            ],
            [],
        )
        trusted = self._check_and_learn(new)
        if not len(self.judgements):
            return asked
        scores, rated = asked.scores.clone(), asked.rated.clone()
        n = self.group_size
        unjudged = [g for g in range(0, len(judged), n) if not any(judged[g : g + n])]
        if unjudged:
            members = [i for g in unjudged for i in range(g, min(g + n, len(judged)))]
            predicted = self._ratings(
                [rollout.examples[i].document for i in members], [rollout.texts[i] for i in members]
            )
            if trusted:
                scores[members] = predicted.to(scores.device, scores.dtype)
                rated[members] = 1.0
            for g in unjudged:
                group = [k for k, i in enumerate(members) if g <= i < g + n]
                self._note(
                    [float(predicted[k]) for k in group],
                    [float(asked.utility[members[k]]) for k in group],
                    f"{self.step}/{g}",
                )
        return RolloutFeedback(scores, rated, asked.utility)

    def choose(
        self, texts: list[str], examples: list[Example], rng: np.random.Generator
    ) -> list[tuple[int, int]]:
        answered = super().choose(texts, examples, rng)
        self._record_spreads({i for pair in answered for i in pair})
        new = rm.Judgements([], [(examples[w].document, texts[w], texts[lo]) for w, lo in answered])
        trusted = self._check_and_learn(new)
        asked = {min(pair) for pair in answered}
        open_pairs = [a for a in range(0, len(texts) - 1, 2) if a not in asked]
        if not len(self.judgements) or not open_pairs:  # nothing learned, or nothing left to score
            return answered
        members = [i for a in open_pairs for i in (a, a + 1)]
        predicted = self._ratings(
            [examples[i].document for i in members], [texts[i] for i in members]
        ).tolist()
        pairs = list(answered)
        for k, a in enumerate(open_pairs):
            score_a, score_b = predicted[2 * k], predicted[2 * k + 1]
            utilities = [
                judge(judging_profile(examples[i], self.profile), texts[i], examples[i].summary).utility
                for i in (a, a + 1)
            ]
            self._note([score_a, score_b], utilities, f"{self.step}/{a}")
            if trusted and score_a != score_b:  # a tie (nothing learned to tell them apart) is no pair
                pairs.append((a, a + 1) if score_a > score_b else (a + 1, a))
        return sorted(pairs, key=min)

    def diagnostics(self) -> dict[str, float]:
        """The round's figures of the reward model: against the true utility, over the samples
        it scored this round (used or not); the gate's share of steps and its held-out
        agreement with the user's latest checked pairs (``-checks`` of them, over rounds)."""
        found: dict[str, float] = {}
        if self.trusted_steps:
            found["reward-model-trusted"] = float(np.mean(self.trusted_steps))
        if self.judgements.checks:
            found["reward-model-heldout-accuracy"] = float(np.mean(self.judgements.checks))
            found["reward-model-checks"] = float(len(self.judgements.checks))
        if not self._predicted:
            return found
        found |= rm.diagnostics(self._predicted, self._utility, self._groups)
        for kind, spreads in self.spreads.items():
            if spreads:
                found[f"reward-model-{kind}-spread"] = float(np.mean(spreads))
        if not self.judgements.rated:  # learned from pairs alone: its scale is arbitrary
            for key in ("reward-model-gap", "reward-model-score"):
                found.pop(key)
        return {key: value for key, value in found.items() if np.isfinite(value)}
