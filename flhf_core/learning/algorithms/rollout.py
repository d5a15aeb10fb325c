"""What every feedback algorithm shares: sampling summaries, their log-probabilities,
and the hyperparameters (asking the user is the scorer's job: ``scorer.py``).

A *rollout* is ``samples_per_prompt`` summaries sampled for each of a few documents,
with the token ids the policy produced. Log-probabilities are recomputed by teacher
forcing those ids, so the same code serves the policy (with gradients) and the frozen
reference model (the model received this round).

On-policy means the sampler and the log-probabilities describe one distribution. The
sampler is plain ancestral sampling at ``temperature`` (no top-k/top-p, no beams, no
repetition or length constraints, none of a checkpoint's own generation defaults:
:func:`~flhf_core.learning.generate.run_defaults_only`), so it draws from softmax(logits / T), and
:func:`token_logprobs` takes log-softmax of logits / T. The rollout keeps the sampler's own
log-probabilities (``sampler_logprobs``) so that this can be checked.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flhf_core.config import RunConfig
from flhf_core.data.corpus import Example
from flhf_core.learning.algorithms.sft import autocast
from flhf_core.learning.generate import decoder_start, run_defaults_only


@dataclass(frozen=True)
class FeedbackConfig:
    """Hyperparameters of the feedback algorithms (each algorithm reads what it needs)."""

    steps: int = 10  # sample-then-update iterations per round
    prompts_per_step: int = 8  # documents per iteration
    samples_per_prompt: int = 4  # n: candidate summaries per document
    learning_rate: float = 3e-4  # AdamW step size for the policy
    kl_coef: float = 0.05  # beta of the KL penalty to the received model (REINFORCE, PPO)
    temperature: float = 1.0  # sampling temperature
    ppo_epochs: int = 4  # PPO: passes over each rollout
    ppo_clip: float = 0.2  # PPO: epsilon of the clipped ratio
    dpo_beta: float = 0.1  # DPO: inverse temperature of the implicit reward
    max_new_tokens: int = 48
    max_source_tokens: int = 192
    max_grad_norm: float = 1.0
    bf16: bool = True
    prompt_code_start: bool = False  # decoder-start = "prompt-code": the decoder starts from the code

    @classmethod
    def from_run_config(cls, config: RunConfig) -> FeedbackConfig:
        return cls(
            steps=config.feedback_steps,
            prompts_per_step=config.feedback_prompts,
            samples_per_prompt=config.samples_per_prompt,
            learning_rate=config.feedback_learning_rate,
            kl_coef=config.kl_coef,
            temperature=config.sample_temperature,
            ppo_epochs=config.ppo_epochs,
            ppo_clip=config.ppo_clip,
            dpo_beta=config.dpo_beta,
            max_new_tokens=config.max_new_tokens,
            max_source_tokens=config.max_source_tokens,
            max_grad_norm=config.max_grad_norm,
            bf16=config.bf16,
            prompt_code_start=config.prompt_code_start,
        )


@dataclass
class Rollout:
    examples: list[Example]  # one per sample (each prompt repeated n times)
    input_ids: torch.Tensor  # [B, S] encoder input
    attention_mask: torch.Tensor  # [B, S]
    response_ids: torch.Tensor  # [B, T] sampled tokens, padded after </s>
    response_mask: torch.Tensor  # [B, T] 1.0 up to and including </s>
    texts: list[str]
    sampler_logprobs: (
        torch.Tensor
    )  # [B, T] log-probability of each token as the sampler drew it (0 where masked)
    codes: torch.Tensor | None = None  # [B] each row's first decoder token (prompt-code start)

    @property
    def labels(self) -> torch.Tensor:
        return self.response_ids.masked_fill(self.response_mask == 0, -100)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The forward pass that teacher-forces the sampled tokens from the start the sampler used."""
        inputs = dict(input_ids=self.input_ids, attention_mask=self.attention_mask, labels=self.labels)
        if self.codes is not None:
            inputs["decoder_input_ids"] = torch.cat([self.codes[:, None], self.response_ids[:, :-1]], dim=1)
        return inputs


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    config: FeedbackConfig,
) -> Rollout:
    """``samples_per_prompt`` sampled summaries of each example's document."""
    model.eval()
    device = next(model.parameters()).device
    n = config.samples_per_prompt
    encoded = tokenizer(
        [e.source for e in examples],
        max_length=config.max_source_tokens,
        truncation=True,
        padding=True,
        return_tensors="pt",
    ).to(device)
    sources = [e.source for e in examples]
    with run_defaults_only(model):
        generated = model.generate(
            **encoded,
            **decoder_start(tokenizer, sources, config.prompt_code_start, device),
            do_sample=True,
            temperature=config.temperature,
            top_k=0,
            top_p=1.0,
            num_beams=1,
            num_return_sequences=n,
            max_new_tokens=config.max_new_tokens,
            output_scores=True,
            return_dict_in_generate=True,
        )
    response = generated.sequences[:, 1:]  # drop the decoder start token (or the prompt's code)
    is_eos = response == tokenizer.eos_token_id
    # keep tokens up to and including the first </s> (all of them if none was produced)
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    mask = (~after_eos).float()
    scores = torch.stack(generated.scores, dim=1).float()  # [B, T, V]: what the sampler drew from
    sampler_logprobs = torch.log_softmax(scores, dim=-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    return Rollout(
        examples=[e for e in examples for _ in range(n)],
        input_ids=encoded["input_ids"].repeat_interleave(n, dim=0),
        attention_mask=encoded["attention_mask"].repeat_interleave(n, dim=0),
        response_ids=response,
        response_mask=mask,
        texts=[t.strip() for t in tokenizer.batch_decode(response, skip_special_tokens=True)],
        sampler_logprobs=sampler_logprobs.masked_fill(mask == 0, 0.0),
        codes=generated.sequences[:, 0] if config.prompt_code_start else None,
    )


def token_logprobs(
    model: PreTrainedModel, rollout: Rollout, bf16: bool = False, temperature: float = 1.0
) -> torch.Tensor:
    """log pi_T(y_t | y_<t, x) = log_softmax(logits / T) for each response token, zero where masked.

    With the sampling temperature T these are the log-probabilities of the distribution
    the tokens were drawn from (on-policy); T = 1 gives the model's own. Shape [B, T].
    """
    device = next(model.parameters()).device
    with autocast(device, bf16):
        logits = model(**rollout.model_inputs()).logits
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = logp.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    return picked * rollout.response_mask


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The reference policy: a frozen copy of the model received this round."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


@dataclass
class RolloutFeedback:
    scores: torch.Tensor  # [B] the user's noisy ratings (0 where unrated)
    rated: torch.Tensor  # [B] 1.0 where the user rated
    utility: torch.Tensor  # [B] true utilities (diagnostics only)

    def summary(self) -> dict[str, float]:
        rated = self.rated.sum().clamp(min=1)
        return {
            "sample_score": ((self.scores * self.rated).sum() / rated).item(),
            "sample_utility": self.utility.mean().item(),
            "rated_fraction": self.rated.mean().item(),
        }


def informative_samples(rated: torch.Tensor, group_size: int) -> torch.Tensor:
    """1.0 for each sample that carries a policy-gradient signal: rated, and its document has
    another rated sample to be its baseline; else 0.0 (flat, one per sample)."""
    m = rated.view(-1, group_size)
    return (m * (m.sum(dim=1, keepdim=True) > 1)).view(-1)


def policy_token_mask(response_mask: torch.Tensor, informative: torch.Tensor) -> torch.Tensor:
    """The response tokens the policy term averages over: those of the informative samples.

    A sample without signal (unrated, within a budget or declined, or alone in its document)
    must not dilute the step: were the policy term averaged over every sampled token, a run
    whose user rated a tenth of the samples would weigh its KL penalty ten times as heavily
    as one with every sample rated, and ``kl-coef`` would mean something else at every budget
    (the KL term still averages over every sampled token: it regularizes all the policy
    writes). DPO averages over its answered pairs alike; DAPO's dynamic sampling (Yu et al.,
    2025, https://arxiv.org/abs/2503.14476) likewise keeps groups without signal out of the
    batch, there to keep its effective size (DAPO has no KL term).
    """
    return response_mask * informative.to(response_mask.dtype)[:, None]


def rloo_advantages(rewards: torch.Tensor, rated: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages, scaled to unit spread (0 where no signal).

    RLOO (Kool et al., 2019; Ahmadian et al., 2024, https://arxiv.org/abs/2402.14740): a
    sample's baseline is the mean rating of the *other* rated samples of the same document,

        A_i = r_i - 1/(k-1) * sum_{j != i} r_j      (k rated samples of the document)

    which does not depend on r_i, so the policy gradient stays unbiased (a group mean that
    includes r_i would not be a valid baseline). Unrated samples, and documents with fewer
    than two ratings, carry no signal. Ratings differ by a few hundredths between samples,
    so the advantages are then divided by their standard deviation over the batch: the
    step size then means the same whatever the reward scale (signs and ratios within the
    batch are kept).
    """
    r = rewards.view(-1, group_size)
    m = rated.view(-1, group_size)
    count = m.sum(dim=1, keepdim=True)
    others = (count - m).clamp(min=1)  # rated samples besides this one
    baseline = ((r * m).sum(dim=1, keepdim=True) - r * m) / others
    informative = informative_samples(rated, group_size)
    advantages = (r - baseline).view(-1) * informative
    # the spread of the informative advantages, without data-dependent branching (no device sync)
    n = informative.sum()
    mean = advantages.sum() / n.clamp(min=1)
    variance = ((advantages - mean) ** 2 * informative).sum() / (n - 1).clamp(min=1)
    spread = torch.where(n >= 2, variance.sqrt() + 1e-6, torch.ones_like(variance))
    return advantages / spread


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref) on tokens sampled from π_θ, averaged over tokens.

    k3 = exp(q) - q - 1 with q = log π_ref - log π_θ: an unbiased, never negative estimate
    of the *value* KL(π_θ || π_ref) (Schulman, 2020, http://joschu.net/blog/kl-approx.html),
    which is what we log as ``kl``.

    Its *gradient* as a loss (tokens fixed, not differentiated through the sampler) is
    another direction: E_{y~π_θ}[∇k3] = E_{y~π_θ}[(1 - π_ref/π_θ) ∇log π_θ]
    = -E_{y~π_ref}[∇log π_θ] = ∇ KL(π_ref || π_θ), per token given the sampled prefix. So
    the penalty pulls the policy toward covering what the reference model would say
    (mass-covering), as in GRPO; tests/learning/test_algorithms.py checks this on a categorical.
    """
    q = (ref_logp - logp) * mask
    return ((q.exp() - q - 1) * mask).sum() / mask.sum().clamp(min=1)


def subset(rollout: Rollout, index: torch.Tensor) -> Rollout:
    """The samples of a rollout at ``index``."""
    keep = index.tolist()
    return Rollout(
        examples=[rollout.examples[i] for i in keep],
        input_ids=rollout.input_ids[index],
        attention_mask=rollout.attention_mask[index],
        response_ids=rollout.response_ids[index],
        response_mask=rollout.response_mask[index],
        texts=[rollout.texts[i] for i in keep],
        sampler_logprobs=rollout.sampler_logprobs[index],
        codes=None if rollout.codes is None else rollout.codes[index],
    )


class StatsMeter:
    """Running means of named figures (a key's mean over the times it was added)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {key.replace("_", "-"): total / self.counts[key] for key, total in self.totals.items()}


def make_optimizer(model: PreTrainedModel, config: FeedbackConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)


def optimizer_step(
    model: PreTrainedModel, optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float
) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()


def pick_prompts(examples: Sequence[Example], count: int, rng: np.random.Generator) -> list[Example]:
    """``count`` documents drawn without replacement (all of them if fewer)."""
    order = rng.permutation(len(examples))[:count]
    return [examples[i] for i in order]
