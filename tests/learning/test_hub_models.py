"""The hub presets' model families (flan-t5, BART) through the code that was written for T5:
LoRA's targets, local-head's layout, and on-policy sampling. Tiny stand-ins from
``tests/hub_checkpoints.py`` replace the hub's checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from flhf_core.config import ConfigError
from flhf_core.data.corpus import Example
from flhf_core.learning import model as M
from flhf_core.learning.algorithms.rollout import FeedbackConfig, sample, token_logprobs

# every linear layer of a block, by each family's names (gated flan-t5 has wi_0/wi_1, no wi)
BLOCK_LINEAR = {
    "flan-t5": {"q", "k", "v", "o", "wi_0", "wi_1", "wo"},
    "bart": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
}


@pytest.mark.parametrize("family", ["flan-t5", "bart"])
def test_lora_adapts_every_linear_layer_of_a_block_in_either_family(hub_checkpoint, family):
    model = M.load_pretrained(hub_checkpoint(family))
    assert set(M.lora_targets(model)) == BLOCK_LINEAR[family]
    adapted = M.add_lora(model, rank=4, seed=0)
    wrapped = {name.rsplit(".", 1)[-1] for name, m in adapted.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == BLOCK_LINEAR[family]
    assert M.personal_parameter_names(adapted, "lora")  # the adapter is what stays home
    assert "lm_head.weight" not in M.personal_parameter_names(adapted, "lora")


def test_lora_refuses_a_model_without_the_known_linear_layers():
    with pytest.raises(ValueError, match="no linear layer named any of q, k, v"):
        M.add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), rank=2, seed=0)


def test_local_head_fits_flan_t5_and_names_why_it_does_not_fit_bart(hub_checkpoint):
    flan = M.load_pretrained(hub_checkpoint("flan-t5"))
    personal = M.personal_parameter_names(flan, "local-head", personal_layers=1)
    assert "lm_head.weight" in personal and any(n.startswith("decoder.block.1.") for n in personal)
    bart = M.load_pretrained(hub_checkpoint("bart"))
    with pytest.raises(ConfigError, match="ties its head to the input embedding"):
        M.personal_parameter_names(bart, "local-head")
    # a BART with a head of its own is still not laid out as local-head expects
    small = dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2)
    small.update(d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64)
    untied = BartForConditionalGeneration(BartConfig(**small, tie_word_embeddings=False))
    with pytest.raises(
        ConfigError, match=r"'local-head' keeps T5's decoder blocks.*personalization = 'lora'"
    ):
        M.personal_parameter_names(untied, "local-head")


def test_bart_sampling_is_on_policy_though_its_decoder_starts_with_its_eos(hub_checkpoint):
    """BART starts decoding from ``</s>`` (its eos) and its checkpoint forces ``<s>`` first: the
    rollout must still drop exactly the start token and score what the sampler drew."""
    folder = hub_checkpoint("bart")
    model, tokenizer = M.load_pretrained(folder), M.load_hub_tokenizer(str(folder))
    assert model.config.decoder_start_token_id == tokenizer.eos_token_id == 2
    with torch.no_grad():  # untrained, a tied head repeats its input token: </s> at once
        model.final_logits_bias[:, tokenizer.eos_token_id] = -4.0
    model.generation_config.forced_bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(0)
    examples = [Example("d", "outcome", "we propose a parser for long sentences", "a parser")] * 2
    config = FeedbackConfig(samples_per_prompt=3, max_new_tokens=12, temperature=0.7, bf16=False)
    rollout = sample(model, tokenizer, examples, config)
    assert rollout.response_mask.sum(dim=1).min() > 1  # more than an immediate </s>
    teacher_forced = token_logprobs(model, rollout, bf16=False, temperature=0.7)
    torch.testing.assert_close(rollout.sampler_logprobs, teacher_forced, atol=1e-4, rtol=1e-4)
