"""PPO with group-relative advantages and a KL penalty to the received model.

Proximal Policy Optimization (Schulman et al., 2017, https://arxiv.org/abs/1707.06347)
reuses each rollout for several epochs while keeping the policy close to the one that
sampled it. Advantages are group-relative as in GRPO (Shao et al., 2024,
https://arxiv.org/abs/2402.03300): a sample's rating minus the mean rating of its
document's samples, so no value network is needed. Per token t of sample i:

    ρ_t   = π_θ(y_t | ...) / π_old(y_t | ...)
    L(θ)  = - mean_t min(ρ_t A_i, clip(ρ_t, 1-ε, 1+ε) A_i)  +  β * KL(π_θ || π_ref)

π_old is the policy at sampling time, π_ref the model received this round (KL
estimated with k3, as in reinforce.py). Logged: the fraction of tokens whose ratio was
clipped and the approximate KL(π_old || π_θ) (k3 again), the usual PPO health checks.
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


def train_ppo(
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
        mask = rollout.response_mask
        with torch.no_grad():
            old_logp = token_logprobs(policy, rollout, config.bf16)
            ref_logp = token_logprobs(reference, rollout, config.bf16)
        meter.add(**feedback.summary())
        for _ in range(config.ppo_epochs):
            logp = token_logprobs(policy, rollout, config.bf16)
            log_ratio = (logp - old_logp) * mask
            ratio = log_ratio.exp()
            unclipped = ratio * advantages[:, None]
            clipped = ratio.clamp(1 - config.ppo_clip, 1 + config.ppo_clip) * advantages[:, None]
            policy_loss = -(torch.min(unclipped, clipped) * mask).sum() / mask.sum()
            kl = kl_k3(logp, ref_logp, mask)
            loss = policy_loss + config.kl_coef * kl
            optimizer_step(policy, optimizer, loss, config.max_grad_norm)
            with torch.no_grad():
                clip_fraction = (((ratio - 1).abs() > config.ppo_clip).float() * mask).sum() / mask.sum()
                approx_kl = (((ratio - 1) - log_ratio) * mask).sum() / mask.sum()
            meter.add(
                loss=loss.item(), kl=kl.item(), clip_fraction=clip_fraction.item(), approx_kl=approx_kl.item()
            )
    return meter.means()
