"""Copy attention (the pointer-generator tiny T5): a normalized distribution, copies when the gate
says so, the same figures step by step as in one pass, and its folders load back."""

from __future__ import annotations

import pytest
import torch

from flhf_core.learning.copy_t5 import CopyT5ForConditionalGeneration
from flhf_core.learning.model import build_tiny_t5, load_pretrained

SOURCES = ["challenge: we parse sentences with graphs.", "approach: a parser for treebanks and more text"]


@pytest.fixture
def model(tokenizer):
    return build_tiny_t5("xs", len(tokenizer), seed=0, copy_attention=True)


@pytest.fixture
def batch(tokenizer):
    return tokenizer(SOURCES, return_tensors="pt", padding=True)


def test_its_output_is_a_distribution_in_training_and_in_evaluation(model, batch, tokenizer):
    labels = tokenizer(
        text_target=["parsing with graphs", "a treebank parser"], return_tensors="pt", padding=True
    )
    for training in (True, False):
        model.train(training)
        logits = model(**batch, labels=labels.input_ids).logits
        assert torch.allclose(logits.exp().sum(-1), torch.ones(logits.shape[:2]), atol=1e-4)


def test_a_closed_gate_copies_only_the_documents_tokens(model, batch):
    with torch.no_grad():
        model.copy_gate.bias.fill_(-30.0)  # p_gen ~ 0: every token is copied
    model.eval()
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    for row, source in zip(generated[:, 1:], batch.input_ids, strict=True):
        assert set(row.tolist()) <= set(source.tolist())


def test_step_by_step_decoding_scores_what_one_pass_scores(model, batch):
    """Generation (encoder once, source ids carried in its outputs, cached decoder states) gives
    the log-probabilities of a full forward pass over the same tokens."""
    model.eval()
    out = model.generate(
        **batch, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        full = model(**batch, decoder_input_ids=out.sequences[:, :-1]).logits
    stepwise = torch.stack(out.scores, dim=1)
    assert torch.allclose(stepwise, full, atol=1e-4)


def test_sampling_and_beams_run_and_the_folder_loads_back(model, batch, tmp_path):
    model.eval()
    samples = model.generate(**batch, max_new_tokens=5, do_sample=True, num_return_sequences=3)
    beams = model.generate(**batch, max_new_tokens=5, num_beams=3)
    assert samples.shape[0] == 6 and beams.shape[0] == 2
    model.save_pretrained(tmp_path / "copy")
    loaded = load_pretrained(tmp_path / "copy").eval()
    assert isinstance(loaded, CopyT5ForConditionalGeneration)
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(**batch, **greedy), model.generate(**batch, **greedy))
