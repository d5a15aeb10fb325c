"""Each feedback algorithm raises the simulated user's reward within a few steps.

A small T5 is first fine-tuned on neutrally prompted ("summarize: ...") summaries of all
aspects, so it writes a blend. Users then ask for summaries of held-out documents.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from flhf_core.config import RunConfig
from flhf_core.data import partitions
from flhf_core.data.corpus import Example, load_corpus
from flhf_core.learning.algorithms import FEEDBACK_ALGORITHMS
from flhf_core.learning.algorithms.ppo import ppo_clip_loss
from flhf_core.learning.algorithms.reinforce import reinforce_loss
from flhf_core.learning.algorithms.rollout import (
    FeedbackConfig,
    Rollout,
    informative_samples,
    kl_k3,
    policy_token_mask,
    rloo_advantages,
    sample,
    token_logprobs,
)
from flhf_core.learning.algorithms.scorer import Scorer
from flhf_core.learning.algorithms.sft import SFTConfig, train_sft
from flhf_core.learning.generate import DecodingConfig, generate_summaries
from flhf_core.learning.model import build_model
from flhf_core.users.feedback import UserProfile, judge

SEED = int(os.environ.get("FLHF_TEST_SEED", "0"))  # rerun with other seeds to check robustness
ALGORITHM_SETTINGS = {  # learning rates as in the presets
    "best-of-n": dict(learning_rate=1e-4),
    "reinforce": dict(learning_rate=3e-4),
    "ppo": dict(learning_rate=1e-4, ppo_epochs=4),
    "dpo": dict(learning_rate=3e-4),
}


@pytest.fixture(scope="module")
def setting(tokenizer):
    # the plain tiny T5 these thresholds were set on (see test_copy_t5.py for the pointer-generator)
    config = RunConfig(tiny_t5_size="s", max_source_tokens=128, copy_attention=False)
    corpus = load_corpus(config)
    heldout_ids = sorted({e.doc_id for e in partitions.heldout_examples(corpus, config)})
    train_ids = [d.doc_id for d in corpus.documents if d.doc_id not in set(heldout_ids)]
    blend = [
        e
        for aspect in corpus.aspects
        for e in partitions.judged_examples(corpus, train_ids, UserProfile(0, aspect), RunConfig())
    ]
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    train_sft(
        model, tokenizer, blend, SFTConfig(epochs=2, learning_rate=3e-3, max_source_tokens=128, bf16=False)
    )
    heldout_ids = heldout_ids[:24]
    # a user who wants summaries about half as long as the model writes, and how the
    # model before any feedback (the no-update control) serves that user
    written = user_view(model, tokenizer, corpus, heldout_ids, UserProfile(0, "outcome", 25))
    terse = UserProfile(0, "outcome", length_words=max(4, round(written["words"] / 2)), length_tolerance=3)
    control = user_view(model, tokenizer, corpus, heldout_ids, terse)
    return model, corpus, train_ids, heldout_ids, terse, control


def user_view(model, tokenizer, corpus, doc_ids, profile):
    """Mean utility, content and words of the model's greedy summaries, as the user judges them."""
    examples = partitions.judged_examples(corpus, doc_ids, profile, RunConfig())
    summaries = generate_summaries(model, tokenizer, [e.source for e in examples], DecodingConfig(), 128)
    judged = [judge(profile, s, e.summary) for s, e in zip(summaries, examples, strict=True)]
    return {k: float(np.mean([getattr(j, k) for j in judged])) for k in ("utility", "content", "words")}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(FEEDBACK_ALGORITHMS))
def test_feedback_raises_reward_on_heldout_documents_without_hacking_it(setting, tokenizer, algorithm):
    """Against the no-update control (the model before feedback), on held-out documents and
    averaged over two seeds: the user's utility rises by a clear margin, and the summaries'
    content (ROUGE-L against the user's aspect) does not collapse. A user who wants half the
    length can be pleased by shorter summaries alone; an update that buys utility by losing a
    third of the content is reward hacking, and fails here.

    Seeded float trajectories differ between CPUs, so one seed on one machine proves little:
    the assertion is on the mean of two seeds (FLHF_TEST_SEED shifts them), with margin.
    """
    base, corpus, train_ids, heldout_ids, profile, control = setting
    examples = list(partitions.judged_examples(corpus, train_ids, profile, RunConfig()))
    config = FeedbackConfig(steps=12, max_source_tokens=128, bf16=False, **ALGORITHM_SETTINGS[algorithm])
    runs = []
    for seed in (SEED, SEED + 1):
        model = copy.deepcopy(base)
        torch.manual_seed(seed)  # sampling draws from torch's generator
        FEEDBACK_ALGORITHMS[algorithm](
            model, tokenizer, examples, Scorer(profile), config, np.random.default_rng(seed)
        )
        runs.append(user_view(model, tokenizer, corpus, heldout_ids, profile))
    utility = float(np.mean([r["utility"] for r in runs]))
    content = float(np.mean([r["content"] for r in runs]))
    assert utility > 1.3 * control["utility"], (control, runs)
    assert content > 0.75 * control["content"], (control, runs)


def test_rloo_baseline_leaves_the_sample_out_and_ignores_unrated():
    rewards = torch.tensor([0.1, 0.3, 0.2, 0.1, 0.3, 0.9, 0.5, 0.0, 0.0])
    rated = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    advantages = rloo_advantages(rewards, rated, group_size=3)
    # doc 1, all rated: r_i - mean of the other two = -0.15, 0.15, 0; doc 2, two rated: -0.2, 0.2
    raw = torch.tensor([-0.15, 0.15, 0.0, -0.2, 0.2, 0.0, 0.0, 0.0, 0.0])
    scale = raw[[0, 1, 2, 3, 4]].std()
    torch.testing.assert_close(advantages, raw / (scale + 1e-6))
    # a group mean that included the sample would give both documents the same spread
    assert advantages[4] / advantages[1] == pytest.approx(4 / 3)
    assert advantages[5] == 0 and (advantages[6:] == 0).all()  # unrated, or alone in its group


def test_reinforce_and_ppo_put_the_kl_on_the_same_per_token_scale():
    """At the first PPO step (ratio 1, nothing clipped) the two surrogates have the same
    gradient: both are per-token averages, as the k3 term is, so kl-coef means the same in
    both (REINFORCE summed over a sequence's tokens was ~20 times stronger than its KL)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, requires_grad=True)
    mask = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3, [1.0] * 5 + [0.0], [1.0] * 2 + [0.0] * 4])
    advantages = torch.tensor([1.0, -0.5, 0.3, -0.8])
    logp = torch.nn.functional.logsigmoid(logits) * mask
    informative = torch.ones(4)
    pg = reinforce_loss(logp, advantages, mask, informative)
    (pg_grad,) = torch.autograd.grad(pg, logits, retain_graph=True)
    clipped, _ = ppo_clip_loss(logp, logp.detach(), advantages, mask, informative, clip=0.2)
    (ppo_grad,) = torch.autograd.grad(clipped, logits)
    torch.testing.assert_close(pg_grad, ppo_grad)


def test_unrated_samples_do_not_weaken_the_policy_term():
    """A budget leaves most documents unrated: their samples carry no advantage and must not
    enter the policy term's average (they did, so a user rating a tenth of the samples got a
    tenth of the policy gradient against the same KL penalty). The rated document's step is
    the same with or without documents beside it that carry no signal: unrated, or with a
    single rating (no baseline)."""
    torch.manual_seed(0)
    rated_logits = torch.randn(4, 6, requires_grad=True)
    unrated_logits = torch.randn(8, 6)
    # one document of 4 samples rated, one with a single rating, one unrated
    rated = torch.tensor([1.0] * 4 + [1.0, 0.0, 0.0, 0.0] + [0.0] * 4)
    scores = torch.cat([torch.tensor([0.2, 0.5, 0.1, 0.4, 0.9]), torch.zeros(7)])
    advantages = rloo_advantages(scores, rated, group_size=4)
    informative = informative_samples(rated, group_size=4)
    assert informative.tolist() == [1.0] * 4 + [0.0] * 8
    mask = torch.ones(12, 6)
    logp = torch.nn.functional.logsigmoid(torch.cat([rated_logits, unrated_logits]))
    alone_logp = torch.nn.functional.logsigmoid(rated_logits)
    ones = torch.ones(4)
    for batch, alone in (
        (
            reinforce_loss(logp, advantages, mask, informative),
            reinforce_loss(alone_logp, advantages[:4], mask[:4], ones),
        ),
        (
            ppo_clip_loss(logp, logp.detach(), advantages, mask, informative, clip=0.2)[0],
            ppo_clip_loss(alone_logp, alone_logp.detach(), advantages[:4], mask[:4], ones, clip=0.2)[0],
        ),
    ):
        (batch_grad,) = torch.autograd.grad(batch, rated_logits, retain_graph=True)
        (alone_grad,) = torch.autograd.grad(alone, rated_logits, retain_graph=True)
        torch.testing.assert_close(batch_grad, alone_grad)  # was a third of it
    token_mask = policy_token_mask(mask, informative)
    assert token_mask.sum() == 24 and token_mask[4:].sum() == 0


def test_k3_penalty_gradient_is_that_of_kl_from_the_reference():
    """On a categorical policy, the expected gradient of the k3 loss (tokens drawn from the
    policy, not differentiated through) equals the gradient of KL(pi_ref || pi_theta), as
    kl_k3's docstring says, and not that of KL(pi_theta || pi_ref)."""
    torch.manual_seed(0)
    theta = torch.randn(7, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(7), dim=0)
    logp = torch.log_softmax(theta, dim=0)
    probs = logp.exp().detach()
    # every outcome y as a one-token sample, weighted by its probability under the policy
    expected = sum(probs[y] * kl_k3(logp[y : y + 1], ref_logp[y : y + 1], torch.ones(1)) for y in range(7))
    (k3_grad,) = torch.autograd.grad(expected, theta)
    forward = (ref_logp.exp() * (ref_logp - torch.log_softmax(theta, dim=0))).sum()
    (forward_grad,) = torch.autograd.grad(forward, theta)
    torch.testing.assert_close(k3_grad, forward_grad)
    reverse = (torch.softmax(theta, 0) * (torch.log_softmax(theta, 0) - ref_logp)).sum()
    (reverse_grad,) = torch.autograd.grad(reverse, theta)
    assert not torch.allclose(k3_grad, reverse_grad, atol=1e-3)


def test_ratings_live_on_the_rollouts_device():
    """Advantages must be where the log-probabilities are (CUDA crashed with them on the CPU);
    the meta device stands in for an accelerator here."""
    examples = [Example("d", "outcome", "a document", "a summary")] * 2
    rollout = Rollout(
        examples=examples,
        input_ids=torch.zeros(2, 3, dtype=torch.long, device="meta"),
        attention_mask=torch.ones(2, 3, device="meta"),
        response_ids=torch.zeros(2, 4, dtype=torch.long, device="meta"),
        response_mask=torch.ones(2, 4, device="meta"),
        texts=["a summary", "another summary"],
        sampler_logprobs=torch.zeros(2, 4, device="meta"),
    )
    feedback = Scorer(UserProfile(0, "outcome")).rate(rollout, np.random.default_rng(0))
    assert {t.device.type for t in (feedback.scores, feedback.rated, feedback.utility)} == {"meta"}
    assert rloo_advantages(feedback.scores, feedback.rated, 2).device.type == "meta"


def test_sampling_is_on_policy_whatever_the_checkpoint_asks_for(tokenizer, tiny_model):
    """A checkpoint's generation_config (repetition constraints, min_length, penalties) must not
    bend the sampler away from the distribution whose log-probabilities the update uses."""
    hostile = dict(no_repeat_ngram_size=1, repetition_penalty=3.0, min_length=12, top_k=5, num_beams=3)
    for key, value in hostile.items():
        setattr(tiny_model.generation_config, key, value)
    torch.manual_seed(0)
    examples = [Example("d", "outcome", "we propose a parser for long sentences", "a parser")] * 2
    config = FeedbackConfig(samples_per_prompt=3, max_new_tokens=16, temperature=0.7, bf16=False)
    rollout = sample(tiny_model, tokenizer, examples, config)
    teacher_forced = token_logprobs(tiny_model, rollout, bf16=False, temperature=0.7)
    torch.testing.assert_close(rollout.sampler_logprobs, teacher_forced, atol=1e-4, rtol=1e-4)
    assert tiny_model.generation_config.repetition_penalty == 3.0  # the checkpoint's own config is restored


@pytest.mark.slow
def test_two_users_each_move_toward_their_own_aspect(setting, tokenizer):
    """From the same model, an approach-user's and an outcome-user's feedback pull apart."""
    base, corpus, train_ids, heldout_ids, _, _ = setting
    profiles = [
        UserProfile(0, "approach", length_tolerance=100),
        UserProfile(1, "outcome", length_tolerance=100),
    ]
    models = []
    for profile in profiles:
        model = copy.deepcopy(base)
        torch.manual_seed(SEED)  # sampling draws from torch's generator
        examples = list(partitions.judged_examples(corpus, train_ids, profile, RunConfig()))
        # 20 steps: at 10 the two users were 0.003 apart, and which came first depended on what an
        # earlier test module had imported (the same numbers on the code before the content levers)
        config = FeedbackConfig(
            steps=20, max_source_tokens=128, bf16=False, **ALGORITHM_SETTINGS["reinforce"]
        )
        FEEDBACK_ALGORITHMS["reinforce"](
            model, tokenizer, examples, Scorer(profile), config, np.random.default_rng(SEED)
        )
        models.append(model)
    for profile in profiles:
        own, other = (
            user_view(m, tokenizer, corpus, heldout_ids, profile)["content"]
            for m in models[:: 1 - 2 * profile.user_id]
        )
        assert own > other, (profile.aspect, own, other)


@pytest.mark.slow
def test_two_users_with_opposite_lengths_get_different_summaries_from_their_conditioning(setting, tokenizer):
    """personalization = soft-prompt: the shared model frozen, each user's conditioning alone
    learns from its own feedback (REINFORCE); a user who wants half the model's length and one
    who wants twice it end with summaries of clearly different lengths, on held-out documents,
    and each is served better by its own conditioning than by the other's (two seeds)."""
    from flhf_core.client.update import only_trainable
    from flhf_core.learning.conditioning import MODULE, add_conditioning

    base, corpus, train_ids, heldout_ids, terse, _ = setting
    written = user_view(base, tokenizer, corpus, heldout_ids, UserProfile(0, "outcome", 25))["words"]
    wordy = UserProfile(1, "outcome", length_words=round(2 * written), length_tolerance=3)
    profiles = (terse, wordy)
    views = {}
    for seed in (SEED, SEED + 1):
        for profile in profiles:
            model = add_conditioning(copy.deepcopy(base), 8)
            torch.manual_seed(seed)
            examples = list(partitions.judged_examples(corpus, train_ids, profile, RunConfig()))
            config = FeedbackConfig(
                steps=12, max_source_tokens=128, learning_rate=0.1, kl_coef=0.0, bf16=False
            )
            with only_trainable(model, frozenset({f"{MODULE}.offset", f"{MODULE}.decoder_offset"})):
                FEEDBACK_ALGORITHMS["reinforce"](
                    model, tokenizer, examples, Scorer(profile), config, np.random.default_rng(seed)
                )
            for judge_as in profiles:
                views[(seed, profile.user_id, judge_as.user_id)] = user_view(
                    model, tokenizer, corpus, heldout_ids, judge_as
                )

    def mean(key, trained, judged):
        return float(np.mean([views[(s, trained, judged)][key] for s in (SEED, SEED + 1)]))

    assert mean("words", 1, 1) > mean("words", 0, 0) + 4, views
    for user in (0, 1):
        assert mean("utility", user, user) > mean("utility", 1 - user, user), views


def test_encoder_repetition_penalty_favours_the_documents_words_whatever_the_padding(tokenizer, smoke_config):
    """``encoder-repetition-penalty`` > 1: an untrained model's greedy summary takes more of its
    words from the document; never the end or padding tokens (a summary does not depend on how
    much padding its batch gave it). On the plain tiny T5: a pointer-generator copies already."""
    tiny_model = build_model(smoke_config.replace(**{"copy-attention": False}), tokenizer)
    source = "approach: we propose a parser for long sentences and evaluate it on treebanks"
    longer = source + " of many languages with a new decoding algorithm and careful analysis"
    words = set(tokenizer(source, add_special_tokens=False)["input_ids"])

    def decode(sources: list[str], penalty: float) -> list[str]:
        decoding = DecodingConfig(
            max_new_tokens=12, no_repeat_ngram_size=0, encoder_repetition_penalty=penalty
        )
        return generate_summaries(tiny_model, tokenizer, sources, decoding, 64)

    def copied(summary: str) -> float:
        ids = tokenizer(summary, add_special_tokens=False)["input_ids"]
        assert ids, "an empty summary"
        return sum(i in words for i in ids) / len(ids)

    alone = decode([source], 50.0)[0]
    assert copied(alone) > copied(decode([source], 1.0)[0]) + 0.3
    assert decode([longer, source], 50.0)[1] == alone  # padded in this batch, the same summary


def test_copy_bias_by_hand():
    """z * p for a positive logit of a source token, z / p for a negative one; special tokens
    and padded positions are never favoured."""
    from flhf_core.learning.generate import CopyBias

    source = torch.tensor([[5, 3, 1, 0], [4, 0, 0, 0]])  # row 0: "5 3 </s>" + pad; row 1: "4" + pads
    attention = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    scores = torch.tensor([[1.0, 2.0, -1.0, 3.0, -2.0, 4.0], [1.0, 2.0, -1.0, 3.0, -2.0, 4.0]])
    biased = CopyBias(2.0, source, attention, special_ids=[0, 1])(None, scores.clone())
    assert biased.tolist() == [[1.0, 2.0, -1.0, 6.0, -2.0, 8.0], [1.0, 2.0, -1.0, 3.0, -1.0, 4.0]]
    beams = CopyBias(2.0, source, attention, special_ids=[0, 1])(None, scores.repeat_interleave(2, dim=0))
    assert beams[1].tolist() == biased[0].tolist() and beams[2].tolist() == biased[1].tolist()


@pytest.mark.parametrize("native", [False, True])
def test_bf16_autocast_only_where_the_device_runs_it_natively(monkeypatch, native):
    """On a CPU without bfloat16 kernels (AVX2 only) autocast emulates it, ~10x slower than fp32:
    ``bf16 = true`` then trains in fp32."""
    from flhf_core.learning.algorithms import sft

    monkeypatch.setattr(sft, "native_bf16", lambda device_type: native)
    with sft.autocast(torch.device("cpu"), enabled=True):
        assert torch.is_autocast_enabled("cpu") is native
    with sft.autocast(torch.device("cpu"), enabled=False):
        assert not torch.is_autocast_enabled("cpu")
