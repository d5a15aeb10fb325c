"""The pretrained warm start (``model = "minilm-warm-start"``): the checked checkpoint, the
initialization Rothe et al. describe, and the model through FLHF's own code paths."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from flhf_core.config import ConfigError, RunConfig
from flhf_core.learning import warm_start
from flhf_core.learning.model import build_model, load_hub_tokenizer, load_pretrained


@pytest.fixture(scope="module")
def model():
    return warm_start.build(seed=0).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_hub_tokenizer(warm_start.NAME)


def test_a_checkpoint_whose_files_differ_from_the_pinned_ones_is_refused(monkeypatch):
    warm_start.checkpoint_folder.cache_clear()
    monkeypatch.setattr(warm_start, "FOLDER_SHA256", "0" * 64)
    try:
        with pytest.raises(ConfigError, match="not the pinned"):
            warm_start.checkpoint_folder()
    finally:
        warm_start.checkpoint_folder.cache_clear()


def test_without_the_extra_the_error_names_it(monkeypatch):
    warm_start.checkpoint_folder.cache_clear()

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    try:
        with pytest.raises(ConfigError, match=r"\[pretrained\]"):
            warm_start.checkpoint_folder()
    finally:
        warm_start.checkpoint_folder.cache_clear()


def test_encoder_is_the_checkpoint_and_the_decoder_starts_from_its_first_layers(model):
    from safetensors.torch import load_file

    pretrained = load_file(warm_start.checkpoint_folder() / "model.safetensors")
    encoder = model.encoder.state_dict()
    assert all(torch.equal(encoder[name], value) for name, value in pretrained.items() if name in encoder)
    assert "encoder.layer.5.attention.self.query.weight" in encoder
    decoder = dict(model.decoder.named_parameters())
    assert len(model.decoder.bert.encoder.layer) == warm_start.DECODER_LAYERS
    assert torch.equal(
        decoder["bert.encoder.layer.1.attention.self.query.weight"],
        pretrained["encoder.layer.1.attention.self.query.weight"],
    )
    assert "bert.encoder.layer.0.crossattention.self.query.weight" in decoder  # fresh
    # the decoder's output layer is its input embedding (tied), so it is sent once
    assert model.decoder.cls.predictions.decoder.weight.data_ptr() == (
        model.decoder.bert.embeddings.word_embeddings.weight.data_ptr()
    )


def test_same_seed_same_model_and_it_survives_save_and_load(model, tokenizer, tmp_path):
    again = build_model(RunConfig(model=warm_start.NAME, seed=0), tokenizer).eval()
    batch = tokenizer(["challenge: we parse sentences with graphs."], return_tensors="pt")
    with torch.no_grad():
        first = model.generate(**batch, max_new_tokens=5, do_sample=False)
        assert torch.equal(first, again.generate(**batch, max_new_tokens=5, do_sample=False))
        model.save_pretrained(tmp_path / "saved")
        loaded = load_pretrained(tmp_path / "saved").eval()
        assert torch.equal(first, loaded.generate(**batch, max_new_tokens=5, do_sample=False))
    assert first[0, 0].item() == tokenizer.cls_token_id  # decoding starts at [CLS]


def test_a_few_steps_on_one_pair_lower_its_loss(tokenizer):
    model = warm_start.build(seed=1).train()
    source = tokenizer(["approach: we train a parser on treebanks."], return_tensors="pt")
    labels = tokenizer(text_target=["a treebank parser."], return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(4):
        loss = model(**source, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_a_lora_adapter_sits_on_berts_attention_and_feed_forward_layers():
    from flhf_core.learning.model import add_lora, personal_parameter_names

    adapted = add_lora(warm_start.build(seed=0), rank=2, seed=0)
    personal = personal_parameter_names(adapted, "lora")
    assert any(".attention.self.query.lora_A" in n for n in personal)
    assert any(".crossattention.self.value.lora_B" in n for n in personal)
    assert any(".intermediate.dense.lora_A" in n for n in personal)


def test_a_user_conditioning_offsets_berts_input_embeddings(model, tokenizer):
    import copy

    from flhf_core.learning.conditioning import MODULE, add_conditioning

    batch = tokenizer(["summarize: we propose a method for parsing"], return_tensors="pt")
    labels = tokenizer(text_target=["they propose a parser"], return_tensors="pt")["input_ids"]
    conditioned = add_conditioning(copy.deepcopy(model), 4)
    with torch.no_grad():
        plain = model(**batch, labels=labels).logits
        assert torch.allclose(conditioned(**batch, labels=labels).logits, plain, atol=1e-6)
        getattr(conditioned, MODULE).offset.normal_(0.0, 1.0)
        assert not torch.allclose(conditioned(**batch, labels=labels).logits, plain, atol=1e-4)
