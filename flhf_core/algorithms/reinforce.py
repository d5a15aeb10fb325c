"""REINFORCE with a per-prompt baseline and a KL penalty to the received model.

Policy gradient (Williams, 1992) on the user's ratings. For a document x the policy
samples n summaries y_1..y_n and the user rates them r_i. The advantage of a sample is
its rating minus the mean rating of the other samples of the same document
(a group baseline, as in RLOO: Ahmadian et al., 2024, https://arxiv.org/abs/2402.14740):

    A_i  = r_i - mean_j r_j
    L(θ) = - mean_i  A_i * sum_t log π_θ(y_i,t | y_i,<t, x)   +   β * KL(π_θ || π_ref)

π_ref is the model received from the server this round, so local updates stay near the
federation's model. The KL is estimated per sampled token with the non-negative
estimator k3 = exp(q) - q - 1, q = log π_ref - log π_θ (Schulman, 2020; as in GRPO).
Unrated samples get no advantage; dropout is off while sampling and updating.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import Example
from ..feedback import UserProfile
from .rollout import (
    FeedbackConfig,
    StatsMeter,
    frozen_copy,
    group_advantages,
    kl_k3,
    make_optimizer,
    optimizer_step,
    pick_prompts,
    rate,
    sample,
    token_logprobs,
)


def train_reinforce(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    profile: UserProfile,
    config: FeedbackConfig,
    rng: np.random.Generator,
) -> dict[str, float]:
    reference = frozen_copy(policy)
    optimizer = make_optimizer(policy, config)
    meter = StatsMeter()
    for _ in range(config.steps):
        rollout = sample(policy, tokenizer, pick_prompts(examples, config.prompts_per_step, rng), config)
        feedback = rate(rollout, profile, rng)
        advantages = group_advantages(feedback.scores, feedback.rated, config.samples_per_prompt)

        logp = token_logprobs(policy, rollout, config.bf16)
        with torch.no_grad():
            ref_logp = token_logprobs(reference, rollout, config.bf16)
        policy_loss = -(advantages * logp.sum(dim=1)).mean()
        kl = kl_k3(logp, ref_logp, rollout.response_mask)
        loss = policy_loss + config.kl_coef * kl
        optimizer_step(policy, optimizer, loss, config.max_grad_norm)

        meter.add(loss=loss.item(), kl=kl.item(), **feedback.summary())
    return meter.means()
