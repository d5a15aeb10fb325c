"""``decoder-start = "prompt-code"``: the decoder's first input is the prompt's control code.

Every path that runs the decoder must start it from the same token: the supervised batches,
greedy and beam decoding, the feedback algorithms' sampler and their teacher-forced
log-probabilities. A path that kept the model's own start token would train one model and
decode or differentiate another.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from flhf_core.config import ConfigError, RunConfig
from flhf_core.data.corpus import Example
from flhf_core.learning.algorithms.rollout import FeedbackConfig, sample, subset, token_logprobs
from flhf_core.learning.batches import Encoded, collate, encode, prompt_codes
from flhf_core.learning.generate import DecodingConfig, generate_summaries

DOCUMENT = "we propose a parser for long sentences and it beats the baseline"
EXAMPLES = [
    Example("d", aspect, DOCUMENT, summary)
    for aspect, summary in (("challenge", "parsing is hard"), ("outcome", "the parser wins by far"))
]


def piece(tokenizer, text: str) -> int:
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


def test_the_code_is_the_first_word_piece_whatever_special_tokens_the_tokenizer_adds(
    tokenizer, hub_checkpoint
):
    assert prompt_codes(tokenizer, [e.source for e in EXAMPLES]) == [
        piece(tokenizer, "challenge"),
        piece(tokenizer, "outcome"),
    ]
    bart = AutoTokenizer.from_pretrained(hub_checkpoint("bart"))  # adds <s> in front of every input
    assert bart("challenge: x")["input_ids"][0] == bart.bos_token_id
    assert prompt_codes(bart, ["challenge: x"]) == [piece(bart, "challenge")]


def test_a_batch_starts_each_rows_decoder_from_its_code_then_the_target_shifted(tokenizer):
    encoded = encode(tokenizer, EXAMPLES, 64, 16, prompt_code_start=True)
    encoded = Encoded.from_json(encoded.to_json())  # as a node's disk cache gives it back
    batch = collate(encoded, [0, 1])
    codes = prompt_codes(tokenizer, [e.source for e in EXAMPLES])
    assert batch.decoder_input_ids[:, 0].tolist() == codes
    targets = batch.labels.masked_fill(batch.labels == -100, tokenizer.pad_token_id)
    assert torch.equal(batch.decoder_input_ids[:, 1:], targets[:, :-1])
    assert batch.model_inputs()["decoder_input_ids"] is batch.decoder_input_ids
    plain = collate(encode(tokenizer, EXAMPLES, 64, 16), [0, 1])
    assert plain.decoder_input_ids is None and "decoder_input_ids" not in plain.model_inputs()


@pytest.mark.parametrize("num_beams", [1, 2])
def test_decoding_starts_from_the_code_and_leaves_it_out_of_the_summary(tokenizer, tiny_model, num_beams):
    """Greedy decoding by hand from each row's code gives the summaries generation returns."""
    torch.manual_seed(0)
    for p in tiny_model.parameters():  # an untrained model: make its outputs depend on the start
        p.data.normal_(0, 0.3)
    sources = [e.source for e in EXAMPLES]
    decoding = DecodingConfig(
        max_new_tokens=6, no_repeat_ngram_size=0, num_beams=num_beams, prompt_code_start=True
    )
    written = generate_summaries(tiny_model, tokenizer, sources, decoding, 64)
    if num_beams > 1:  # beam search need not find the greedy path: it starts from the code all the same
        starts = []
        original = tiny_model.generate
        tiny_model.generate = lambda **kw: starts.append(kw["decoder_start_token_id"]) or original(**kw)
        generate_summaries(tiny_model, tokenizer, sources, decoding, 64)
        assert sorted(starts[0].tolist()) == sorted(prompt_codes(tokenizer, sources))
        assert not any(s.lower().startswith(("challenge", "outcome")) for s in written)
        return
    tiny_model.eval()
    for source, summary in zip(sources, written, strict=True):
        encoded = tokenizer([source], return_tensors="pt")
        decoder = torch.tensor([prompt_codes(tokenizer, [source])])
        with torch.no_grad():
            for _ in range(6):
                logits = tiny_model(**encoded, decoder_input_ids=decoder).logits[:, -1]
                decoder = torch.cat([decoder, logits.argmax(-1, keepdim=True)], dim=1)
                if decoder[0, -1] == tokenizer.eos_token_id:
                    break
        assert summary == tokenizer.decode(decoder[0, 1:], skip_special_tokens=True).strip()
    model_start = generate_summaries(tiny_model, tokenizer, sources, DecodingConfig(max_new_tokens=6), 64)
    assert model_start != written  # the start token changes what is written


def test_sampling_from_the_code_is_on_policy(tokenizer, tiny_model):
    """The teacher-forced log-probabilities the updates differentiate are the sampler's own,
    also for a subset of the rollout (best-of-n trains on its chosen samples)."""
    torch.manual_seed(0)
    config = FeedbackConfig(samples_per_prompt=3, max_new_tokens=12, bf16=False, prompt_code_start=True)
    rollout = sample(tiny_model, tokenizer, EXAMPLES, config)
    codes = prompt_codes(tokenizer, [e.source for e in EXAMPLES])
    assert rollout.codes.tolist() == [c for c in codes for _ in range(3)]
    torch.testing.assert_close(
        rollout.sampler_logprobs, token_logprobs(tiny_model, rollout), atol=1e-4, rtol=1e-4
    )
    part = subset(rollout, torch.tensor([4, 0]))
    torch.testing.assert_close(part.sampler_logprobs, token_logprobs(tiny_model, part), atol=1e-4, rtol=1e-4)


def test_every_stage_of_a_run_gets_the_setting(tokenizer, smoke_config):
    """Supervised batches, the user's cached token ids, the server's held-out batches, decoding and
    the feedback algorithms all read ``decoder-start`` from the run config."""
    from flhf_core.client.documents import encode_training
    from flhf_core.learning.algorithms.sft import SFTConfig
    from flhf_core.learning.metrics import evaluate_model

    config = smoke_config.replace(**{"decoder-start": "prompt-code"})
    assert SFTConfig.from_run_config(config, 1e-3, 0).prompt_code_start
    assert FeedbackConfig.from_run_config(config).prompt_code_start
    assert DecodingConfig.from_run_config(config).prompt_code_start
    from_model = smoke_config.replace(**{"decoder-start": "model"})
    assert not DecodingConfig.from_run_config(from_model).prompt_code_start
    documents = SimpleNamespace(train=tuple(EXAMPLES))  # a user's documents: their training examples
    assert encode_training(tokenizer, documents, config).codes is not None
    assert encode_training(tokenizer, documents, from_model).codes is None
    seen = []

    class Recorder(torch.nn.Module):  # records what evaluate_model's loss pass gives the model
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **inputs):
            seen.append(inputs)
            return type("Out", (), {"logits": torch.zeros(*inputs["labels"].shape, len(tokenizer))})()

    evaluate_model(Recorder(), tokenizer, EXAMPLES, config, predictions=["x", "y"])
    assert "decoder_input_ids" in seen[0]


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"decoder-start": "code"}, "decoder-start.*'code'"),
        (
            {"decoder-start": "prompt-code", "aspect-prompt": "question"},
            "decoder-start: .*aspect-prompt='question'",
        ),
        (
            {"decoder-start": "prompt-code", "partitioning": "preference"},
            "decoder-start: .*partitioning='preference'",
        ),
    ],
)
def test_decoder_start_refuses_prompts_without_a_code_of_their_own(changes, named):
    assert RunConfig.from_mapping({"decoder-start": "prompt-code"}).prompt_code_start
    assert not RunConfig().prompt_code_start
    with pytest.raises(ConfigError, match=named):
        RunConfig.from_mapping(changes)


def test_aspects_that_begin_alike_are_refused(tokenizer):
    from flhf_core.learning.batches import check_distinct_codes

    check_distinct_codes(tokenizer, ("challenge", "approach", "outcome"))
    check_distinct_codes(tokenizer, ("tldr", "key"))  # "key" begins with a bare "▁": its code is "key"
    with pytest.raises(ConfigError, match="'challenge' and 'challenge_b' begin with the same word piece"):
        check_distinct_codes(tokenizer, ("challenge", "outcome", "challenge_b"))
