"""Online DPO on the simulated user's pairwise preferences.

Direct Preference Optimization (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290)
fits the policy to preferences without a reward model. Here the pairs are sampled from
the current policy and judged by the user each step (online DPO: Guo et al., 2024,
https://arxiv.org/abs/2402.04792). For a preferred summary y_w and a rejected y_l of x,
with π_ref the model received this round:

    h(θ) = β * [ (log π_θ(y_w|x) - log π_ref(y_w|x)) - (log π_θ(y_l|x) - log π_ref(y_l|x)) ]
    L(θ) = - mean log σ(h(θ))

The n samples of a document form n/2 disjoint pairs; the scorer (``scorer.py``) returns
the pairs answered: by the user, who answers with probability ``rating_rate`` (within
``ratings-per-round``, if set) and chooses by the Bradley-Terry model of their profile, or
by a learned reward model for the pairs the user was not asked about.
Logged: the share of pairs where the implicit reward ranks the winner first.
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
    make_optimizer,
    optimizer_step,
    pick_prompts,
    sample,
    token_logprobs,
)
from flhf_core.learning.algorithms.scorer import Scorer


def train_dpo(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    scorer: Scorer,
    config: FeedbackConfig,
    rng: np.random.Generator,
) -> dict[str, float]:
    if config.samples_per_prompt < 2 or config.samples_per_prompt % 2:
        raise ValueError("dpo needs an even number of samples per prompt (pairs)")
    reference = frozen_copy(policy)
    optimizer = make_optimizer(policy, config)
    meter = StatsMeter()
    for _ in range(config.steps):
        rollout = sample(policy, tokenizer, pick_prompts(examples, config.prompts_per_step, rng), config)
        pairs = scorer.choose(rollout.texts, rollout.examples, rng)
        meter.add(pairs=float(len(pairs)))
        if not pairs:
            continue
        device = rollout.response_ids.device
        winners = torch.tensor([w for w, _ in pairs], device=device)
        losers = torch.tensor([lo for _, lo in pairs], device=device)
        logp = token_logprobs(policy, rollout, config.bf16).sum(dim=1)
        with torch.no_grad():
            ref_logp = token_logprobs(reference, rollout, config.bf16).sum(dim=1)
        margin = (logp - ref_logp)[winners] - (logp - ref_logp)[losers]
        loss = -torch.nn.functional.logsigmoid(config.dpo_beta * margin).mean()
        optimizer_step(policy, optimizer, loss, config.max_grad_norm)
        meter.add(loss=loss.item(), reward_accuracy=(margin > 0).float().mean().item())
    return meter.means()
