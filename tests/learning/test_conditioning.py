"""The user conditioning (personalization = soft-prompt): zero is the shared model, an offset
steers it, and it follows the model through copies, generation and every model family."""

from __future__ import annotations

import copy

import pytest
import torch

from flhf_core.learning.conditioning import MODULE, add_conditioning
from flhf_core.learning.generate import summarize
from flhf_core.learning.model import build_model, load_pretrained, personal_parameter_names


def conditioned(config, tokenizer, tokens=4):
    model = build_model(config, tokenizer)
    return model, add_conditioning(copy.deepcopy(model), tokens)


def test_a_zero_conditioning_is_the_shared_model_and_an_offset_changes_it(smoke_config, tokenizer, logits_of):
    plain, model = conditioned(smoke_config, tokenizer)
    assert torch.equal(logits_of(plain), logits_of(model))
    for part in ("decoder_offset", "offset"):  # each part alone steers it
        with torch.no_grad():
            getattr(getattr(model, MODULE), part).normal_(0.0, 1.0)
        assert not torch.allclose(logits_of(plain), logits_of(model), atol=1e-4), part


def test_only_the_first_tokens_are_offset(smoke_config, tokenizer):
    """An offset on the first P embeddings changes no other position's input embedding."""
    _, model = conditioned(smoke_config, tokenizer, tokens=3)
    seen = {}
    encoder = model.get_encoder()
    encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        getattr(model, MODULE).offset.fill_(1.0)
    ids = tokenizer(["summarize: we propose a method for parsing"], return_tensors="pt")["input_ids"]
    encoder(input_ids=ids)
    plain = encoder.get_input_embeddings()(ids)
    difference = (seen["embeds"] - plain).abs().sum(-1)[0]
    assert torch.allclose(difference[:3], torch.full((3,), float(plain.size(-1))))
    assert torch.equal(difference[3:], torch.zeros(ids.size(1) - 3))


def test_the_conditioning_is_the_only_personal_parameter_and_copies_keep_it_wired(
    smoke_config, tokenizer, logits_of
):
    _, model = conditioned(smoke_config, tokenizer)
    assert personal_parameter_names(model, "soft-prompt") == {f"{MODULE}.offset", f"{MODULE}.decoder_offset"}
    clone = copy.deepcopy(model)  # the feedback algorithms' frozen reference is such a copy
    with torch.no_grad():
        getattr(clone, MODULE).offset.normal_(0.0, 1.0)
    assert not torch.allclose(logits_of(model), logits_of(clone), atol=1e-4)
    assert torch.count_nonzero(getattr(model, MODULE).offset) == 0  # the original is untouched


def test_gradients_reach_the_conditioning(smoke_config, tokenizer):
    _, model = conditioned(smoke_config, tokenizer)
    batch = tokenizer(["summarize: we propose a method for parsing"], return_tensors="pt")
    labels = tokenizer(text_target=["they propose a parser"], return_tensors="pt")["input_ids"]
    model(**batch, labels=labels).loss.backward()
    grad = getattr(model, MODULE).offset.grad
    assert grad is not None and torch.count_nonzero(grad[:2]) > 0


def test_generation_reads_the_conditioning(smoke_config, tokenizer):
    config = smoke_config.replace(**{"max-new-tokens": 8})
    _, model = conditioned(config, tokenizer)
    source = ["summarize: we propose a method for parsing sentences with a neural network"]
    before = summarize(model, tokenizer, source, config)
    with torch.no_grad():
        getattr(model, MODULE).offset.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(0))
    assert summarize(model, tokenizer, source, config) != before


@pytest.mark.parametrize("family", ["flan-t5", "bart"])
def test_hub_families_take_a_conditioning(hub_checkpoint, family):
    from transformers import AutoTokenizer

    folder = hub_checkpoint(family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_pretrained(folder).eval()
    batch = tokenizer(["summarize: we propose a method for parsing"], return_tensors="pt")
    labels = tokenizer(text_target=["they propose a parser"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(**batch, labels=labels).logits
        add_conditioning(model, 4)
        assert torch.equal(model(**batch, labels=labels).logits, plain)
        getattr(model, MODULE).offset.normal_(0.0, 1.0)
        assert not torch.allclose(model(**batch, labels=labels).logits, plain, atol=1e-4)


def test_a_reward_model_copied_from_a_conditioned_summarizer_reads_no_conditioning(smoke_config, tokenizer):
    from flhf_core.learning.reward_model import RewardModel

    _, model = conditioned(smoke_config, tokenizer)
    with torch.no_grad():
        getattr(model, MODULE).offset.normal_(0.0, 1.0)
    reward_model = RewardModel.from_summarizer(model)
    batch = tokenizer(["summarize: we propose a method for parsing"], return_tensors="pt")
    plain = RewardModel.from_summarizer(build_model(smoke_config, tokenizer))
    plain.encoder.load_state_dict(reward_model.encoder.state_dict())
    reward_model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(
            reward_model.pooled(batch["input_ids"], batch["attention_mask"]),
            plain.pooled(batch["input_ids"], batch["attention_mask"]),
        )
