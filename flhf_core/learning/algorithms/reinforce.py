"""REINFORCE with a leave-one-out baseline (RLOO) and a KL penalty to the received model.

Policy gradient (Williams, 1992) on the user's ratings. For a document x the policy
samples k summaries y_1..y_k at temperature T and the user rates them r_i. A sample's
advantage is its rating minus the mean rating of the *other* samples of the same document
(RLOO: Kool et al., 2019; Ahmadian et al., 2024, https://arxiv.org/abs/2402.14740),
scaled to unit spread over the batch (:func:`~flhf_core.learning.algorithms.rollout.rloo_advantages`).
The loss is averaged per token, as PPO's is, so that ``kl-coef`` means the same in both:

    A_i  = r_i - 1/(k-1) sum_{j != i} r_j
    L(θ) = - 1/N_A sum_{i in I,t} A_i log π_θ(y_i,t | y_i,<t, x)   +   β * 1/N sum_{i,t} k3_i,t

I is the informative samples (rated, with another rated sample of the document), N_A their
response tokens, N all the batch's (:func:`~flhf_core.learning.algorithms.rollout.policy_token_mask`:
so that a feedback budget that leaves samples unrated does not weaken the policy term
against the KL term); π_θ's log-probabilities are of logits / T,
the distribution the tokens were drawn from. π_ref is the model received from the server
this round, so local updates stay near the federation's model; k3 = exp(q) - q - 1,
q = log π_ref - log π_θ (Schulman, 2020), whose gradient is that of KL(π_ref || π_θ)
(see :func:`~flhf_core.learning.algorithms.rollout.kl_k3`). At the first step REINFORCE's loss and
gradient equal PPO's (ratio 1, nothing clipped). Unrated samples get no advantage; dropout
is off while sampling and updating.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flhf_core.data.corpus import Example
from flhf_core.learning.algorithms.rollout import (
    FeedbackConfig,
    StatsMeter,
    frozen_copy,
    informative_samples,
    kl_k3,
    make_optimizer,
    optimizer_step,
    pick_prompts,
    policy_token_mask,
    rloo_advantages,
    sample,
    token_logprobs,
)
from flhf_core.learning.algorithms.scorer import Scorer


def reinforce_loss(
    logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, informative: torch.Tensor
) -> torch.Tensor:
    """- 1/N_A sum_{i in I,t} A_i log π(y_i,t): the policy-gradient surrogate, per token of
    the informative samples ``I`` (``informative``: 1.0 per sample in I)."""
    signal = policy_token_mask(mask, informative)
    return -(advantages[:, None] * logp * signal).sum() / signal.sum().clamp(min=1)


def train_reinforce(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    scorer: Scorer,
    config: FeedbackConfig,
    rng: np.random.Generator,
) -> dict[str, float]:
    reference = frozen_copy(policy)
    optimizer = make_optimizer(policy, config)
    meter = StatsMeter()
    for _ in range(config.steps):
        rollout = sample(policy, tokenizer, pick_prompts(examples, config.prompts_per_step, rng), config)
        feedback = scorer.rate(rollout, rng)
        advantages = rloo_advantages(feedback.scores, feedback.rated, config.samples_per_prompt)

        logp = token_logprobs(policy, rollout, config.bf16, config.temperature)
        with torch.no_grad():
            ref_logp = token_logprobs(reference, rollout, config.bf16, config.temperature)
        informative = informative_samples(feedback.rated, config.samples_per_prompt)
        policy_loss = reinforce_loss(logp, advantages, rollout.response_mask, informative)
        kl = kl_k3(logp, ref_logp, rollout.response_mask)
        loss = policy_loss + config.kl_coef * kl
        optimizer_step(policy, optimizer, loss, config.max_grad_norm)

        meter.add(loss=loss.item(), policy_loss=policy_loss.item(), kl=kl.item(), **feedback.summary())
    return meter.means()
