from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from transformers import T5ForConditionalGeneration

from flhf_core.config import ConfigError, RunConfig
from flhf_core.learning import model as M


def test_shipped_tokenizer_round_trips_with_t5_special_ids(tokenizer):
    text = "They propose a statistical method for ranking candidate answers."
    ids = tokenizer(text)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) == 6000


def test_client_refuses_a_tokenizer_with_another_hash(smoke_config, tokenizer):
    good = M.TokenizerSpec(M.tokenizer_fingerprint(tokenizer))
    assert M.tokenizer_fingerprint(M.client_tokenizer(smoke_config, good)) == good.sha256
    with pytest.raises(M.TokenizerMismatch, match="differs from the server's"):
        M.client_tokenizer(smoke_config, M.TokenizerSpec("0" * 64))


def test_fingerprint_ignores_truncation_and_padding_state(tokenizer):
    before = M.tokenizer_fingerprint(tokenizer)
    tokenizer(["a b c", "a"], max_length=2, truncation=True, padding=True)
    assert M.tokenizer_fingerprint(tokenizer) == before
    assert M.tokenizer_fingerprint(M.shipped_tokenizer()) == before


def test_server_trains_and_sends_a_tokenizer_for_other_data(tmp_path):
    import json

    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(
            json.dumps({"document": f"text {i} about {i % 4}", "summary": f"s {i}"}) + "\n" for i in range(30)
        )
    )
    config = RunConfig(dataset=str(path))
    from flhf_core.data.corpus import load_corpus

    tokenizer, spec = M.server_tokenizer(config, load_corpus(config))
    assert spec.payload and spec.sha256 == M.tokenizer_fingerprint(tokenizer)
    received = M.client_tokenizer(config, spec)
    assert received("text 3 about 3")["input_ids"] == tokenizer("text 3 about 3")["input_ids"]
    tampered = M.TokenizerSpec(spec.sha256, spec.payload.replace(b'"<unk>"', b'"<UNK>"', 1))
    with pytest.raises(M.TokenizerMismatch):
        M.client_tokenizer(config, tampered)


def test_tiny_t5_head_is_untied_and_each_parameter_travels_once(tiny_model):
    assert tiny_model.lm_head.weight.data_ptr() != tiny_model.shared.weight.data_ptr()
    record = M.parameters_to_record(tiny_model)
    assert "lm_head.weight" in record and "shared.weight" in record
    assert "encoder.embed_tokens.weight" not in record  # an alias of shared.weight
    payload = 4 * sum(p.numel() for p in tiny_model.parameters())  # float32, each parameter once
    assert 0 <= M.record_nbytes(record) - payload <= 256 * len(record)  # plus a .npy header each


def test_same_seed_same_initial_model(smoke_config, tokenizer):
    a = M.parameters_to_record(M.build_model(smoke_config, tokenizer))
    b = M.parameters_to_record(M.build_model(smoke_config, tokenizer))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_initial_loss_is_near_uniform(smoke_config, tokenizer):
    plain = M.build_model(smoke_config.replace(**{"copy-attention": False}), tokenizer)  # no copy gate
    batch = tokenizer(["challenge: a document"], return_tensors="pt")
    labels = tokenizer(text_target=["a summary"], return_tensors="pt")["input_ids"]
    loss = plain(**batch, labels=labels).loss.item()
    assert abs(loss - np.log(len(tokenizer))) < 1.5  # not ~20 as with an unscaled untied head


def test_record_round_trip_and_checks(smoke_config, tokenizer, tiny_model):
    other = M.build_model(smoke_config.replace(seed=7), tokenizer)
    M.record_to_parameters(other, M.parameters_to_record(tiny_model))
    for (name, p), q in zip(tiny_model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q), name
    record = M.parameters_to_record(tiny_model)
    bad = ArrayRecord(
        {k: Array(np.full_like(v.numpy(), np.nan)) if k == "lm_head.weight" else v for k, v in record.items()}
    )
    with pytest.raises(ValueError, match=r"lm_head\.weight has non-finite values"):
        M.record_to_parameters(other, bad)
    del record["lm_head.weight"]
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        M.record_to_parameters(other, record)


def test_save_and_load_round_trip(tmp_path, tiny_model, logits_of):
    tiny_model.save_pretrained(tmp_path)
    loaded = M.load_pretrained(tmp_path)
    assert isinstance(loaded, M.UntiedT5ForConditionalGeneration)
    assert loaded.lm_head.weight.data_ptr() != loaded.shared.weight.data_ptr()
    assert (tmp_path / "model.safetensors").is_file()
    assert torch.allclose(logits_of(tiny_model), logits_of(loaded))


def test_hub_code_path_with_a_local_checkpoint(tmp_path, tokenizer, tied_t5):
    """A user names a Hugging Face checkpoint; here a local folder stands in for the hub."""
    tied_t5.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    run = RunConfig(model=str(tmp_path))
    hub_tokenizer, spec = M.server_tokenizer(run, corpus=None)
    model = M.build_model(run, hub_tokenizer)
    assert isinstance(model, T5ForConditionalGeneration) and not spec.payload
    assert "lm_head.weight" not in M.parameters_to_record(model)  # tied: sent once, as shared.weight


def test_unknown_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model: cannot load"):
        M.load_pretrained(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match="model: cannot load a tokenizer"):
        M.load_hub_tokenizer(str(tmp_path / "no-such-model"))


def test_a_tokenizer_trained_for_other_data_never_sees_the_heldout_documents(tmp_path, monkeypatch):
    """What the tokenizer is trained on holds the training documents' words, never a held-out one's."""
    import json

    from flhf_core.data import partitions
    from flhf_core.data.corpus import Document, load_corpus

    ids = [f"doc-{i}" for i in range(60)]
    config = RunConfig(dataset=str(tmp_path / "d.jsonl"))
    secret = next(i for i in ids if partitions.is_heldout(Document(i, "", "", ()), config))
    rows = [
        {"id": i, "document": "zyzzyvaquux" if i == secret else f"text {i} about parsing", "summary": "s"}
        for i in ids
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen: list[str] = []
    real = M.train_tokenizer
    monkeypatch.setattr(
        M, "train_tokenizer", lambda texts, vocab_size: seen.extend(texts) or real(texts, vocab_size)
    )
    M.server_tokenizer(config, load_corpus(config))
    assert any("parsing" in t for t in seen) and not any("zyzzyvaquux" in t for t in seen)
