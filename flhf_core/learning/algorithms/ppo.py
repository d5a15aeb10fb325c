"""PPO with group-relative advantages and a KL penalty to the received model.

Proximal Policy Optimization (Schulman et al., 2017, https://arxiv.org/abs/1707.06347)
reuses each rollout for several epochs while keeping the policy close to the one that
sampled it. Advantages are relative to the document's other samples, as in GRPO (Shao et
al., 2024, https://arxiv.org/abs/2402.03300), with the leave-one-out baseline of
reinforce.py (:func:`~flhf_core.learning.algorithms.rollout.rloo_advantages`), so no value network
is needed. Per token t of sample i:

    ρ_t   = π_θ(y_t | ...) / π_old(y_t | ...)
    L(θ)  = - 1/N_A sum_{i in I,t} min(ρ_t A_i, clip(ρ_t, 1-ε, 1+ε) A_i)  +  β * 1/N sum_{i,t} k3_i,t

the surrogate averaged over the N_A tokens of the informative samples I (rated, with a
baseline), the penalty over all N tokens of the batch, as in reinforce.py
(:func:`~flhf_core.learning.algorithms.rollout.policy_token_mask`: unrated samples must not weaken
the surrogate against the penalty).

π_old is the policy at sampling time, π_ref the model received this round (k3 as in
reinforce.py: the same per-token scale, so ``kl-coef`` means the same in both; its
gradient is that of KL(π_ref || π_θ)). All log-probabilities are of logits / T, the
sampling distribution. Logged: the fraction of the informative samples' tokens whose ratio
was clipped and the approximate KL(π_old || π_θ) over every token (k3 again), the usual PPO
health checks.
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


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    informative: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate, per token of the informative samples (``informative``: 1.0 per
    sample in I), and the ratio ρ = π_θ / π_old of every response token."""
    ratio = ((logp - old_logp) * mask).exp()
    unclipped = ratio * advantages[:, None]
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages[:, None]
    signal = policy_token_mask(mask, informative)
    return -(torch.min(unclipped, clipped) * signal).sum() / signal.sum().clamp(min=1), ratio


def train_ppo(
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
        informative = informative_samples(feedback.rated, config.samples_per_prompt)
        mask = rollout.response_mask
        signal = policy_token_mask(mask, informative)  # the tokens the clip acts on
        with torch.no_grad():
            old_logp = token_logprobs(policy, rollout, config.bf16, config.temperature)
            ref_logp = token_logprobs(reference, rollout, config.bf16, config.temperature)
        meter.add(**feedback.summary())
        for _ in range(config.ppo_epochs):
            logp = token_logprobs(policy, rollout, config.bf16, config.temperature)
            policy_loss, ratio = ppo_clip_loss(logp, old_logp, advantages, mask, informative, config.ppo_clip)
            log_ratio = (logp - old_logp) * mask
            kl = kl_k3(logp, ref_logp, mask)
            loss = policy_loss + config.kl_coef * kl
            optimizer_step(policy, optimizer, loss, config.max_grad_norm)
            with torch.no_grad():
                clipped = ((ratio - 1).abs() > config.ppo_clip).float() * signal
                clip_fraction = clipped.sum() / signal.sum().clamp(min=1)
                approx_kl = (((ratio - 1) - log_ratio) * mask).sum() / mask.sum()
            meter.add(
                loss=loss.item(),
                policy_loss=policy_loss.item(),
                kl=kl.item(),
                clip_fraction=clip_fraction.item(),
                approx_kl=approx_kl.item(),
            )
    return meter.means()
