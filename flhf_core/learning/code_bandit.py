"""The simplest personalization feedback can teach: a user picks among the control codes.

``code-bandit`` keeps the shared model as it is and learns, from the user's judgements
alone, which code to ask it for. Each code is an arm of a bandit; its reward is the user's
rating of a summary the model wrote for that code. Thompson sampling (Thompson, 1933;
Russo et al., 2018, https://arxiv.org/abs/1707.02038) with a Gaussian posterior per arm:

    mean_k | ratings ~ N(m_k, s^2 / (n_k + n0))      m_k = (n0 m0 + sum of ratings) / (n0 + n_k)

with a prior of ``n0`` pseudo-ratings at ``m0`` and ``s`` the ratings' scale. Each judgement
draws one mean per arm and asks for the arm with the largest draw. The user is served the arm
with the best posterior mean. The state is two arrays (count and sum per code), carried by the
client's model as untrained parameters (:class:`CodeBanditState`), so that it is personal like
any other personal state: kept and restored on the device, never sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

PRIOR_COUNT = 1.0  # n0: pseudo-ratings of the prior
PRIOR_MEAN = 0.5  # m0: ratings lie in [0, 1]; an optimistic start tries every arm early
SCALE = 0.1  # s: the spread of one rating around its arm's mean (a code's utility varies by document about this much)


@dataclass
class CodeBandit:
    """Counts and sums of the ratings each of ``arms`` codes received."""

    counts: np.ndarray
    sums: np.ndarray

    @classmethod
    def fresh(cls, arms: int) -> CodeBandit:
        return cls(np.zeros(arms), np.zeros(arms))

    def posterior_mean(self) -> np.ndarray:
        return (PRIOR_COUNT * PRIOR_MEAN + self.sums) / (PRIOR_COUNT + self.counts)

    def choose(self, rng: np.random.Generator) -> int:
        """The arm to ask for next: the largest draw from each arm's posterior."""
        spread = SCALE / np.sqrt(PRIOR_COUNT + self.counts)
        return int(np.argmax(rng.normal(self.posterior_mean(), spread)))

    def update(self, arm: int, rating: float) -> None:
        self.counts[arm] += 1
        self.sums[arm] += rating

    def best(self) -> int:
        """The arm the user is served: the best posterior mean (ties: the lowest index)."""
        return int(np.argmax(self.posterior_mean()))


MODULE = "code_bandit"  # the attribute on a client's model; its state is code_bandit.counts/.sums


class CodeBanditState(nn.Module):
    """A user's bandit state, carried by the client's model as two untrained parameters, so
    that it is kept, restored and never sent exactly as any personal parameter is."""

    def __init__(self, arms: int) -> None:
        super().__init__()
        self.counts = nn.Parameter(torch.zeros(arms), requires_grad=False)
        self.sums = nn.Parameter(torch.zeros(arms), requires_grad=False)

    def bandit(self) -> CodeBandit:
        """The state as a :class:`CodeBandit` (copies; :meth:`store` writes one back)."""
        return CodeBandit(
            self.counts.detach().cpu().double().numpy().copy(),
            self.sums.detach().cpu().double().numpy().copy(),
        )

    def store(self, bandit: CodeBandit) -> None:
        with torch.no_grad():
            self.counts.copy_(torch.from_numpy(bandit.counts))
            self.sums.copy_(torch.from_numpy(bandit.sums))


def add_code_bandit(model: PreTrainedModel, arms: int) -> PreTrainedModel:
    """Give a client's ``model`` a fresh bandit state over ``arms`` codes (it changes no output)."""
    setattr(model, MODULE, CodeBanditState(arms))
    return model


def bandit_of(model: PreTrainedModel) -> CodeBanditState:
    return getattr(model, MODULE)


def served_prompt(model: PreTrainedModel, prompts: Sequence[str]) -> str | None:
    """The instruction a code-bandit user asks its model with: the prompt of the code of best
    posterior mean (``prompts``: the codes' prompts, in the bandit's arm order), or None while
    nothing is rated yet (the user asks neutrally, as everyone)."""
    bandit = bandit_of(model).bandit()
    return prompts[bandit.best()] if bandit.counts.any() else None
