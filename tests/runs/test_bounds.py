"""Bounds of personalization from a global model: oracle, best shared code, neutral request, rules."""

from __future__ import annotations

import pytest

from flhf_core.config import ConfigError, RunConfig
from flhf_core.data import codes
from flhf_core.data.corpus import load_corpus
from flhf_core.runs.bounds import bounds

PERSONALIZE = {
    "partitioning": "codes",
    "user-profiles": "personalize",
    "eval-max-examples": 12,
    "reward-documents": 6,
}


def ideal_writer(aspects):
    """Writes each code's target exactly; asked neutrally, the approach medium target."""
    by_prompt = {code.prompt: code for code in codes.all_codes(aspects)}

    def write(requests):
        return [
            codes.target(doc, by_prompt.get(instruction, codes.Code("approach", "medium")))
            for doc, instruction in requests
        ]

    return write


def test_an_ideal_writer_puts_the_oracle_on_top_and_the_shared_code_between():
    config = RunConfig().replace(**PERSONALIZE)
    corpus = load_corpus(config)
    result = bounds(config, corpus, 12, ideal_writer(corpus.aspects))
    mean = result["mean"]
    assert mean["oracle"] > mean["best-shared-code"] >= mean["fedavg-sft"] * 0.9
    assert mean["oracle"] > 2 * mean["best-shared-code"]  # one code cannot serve six groups
    assert result["oracle-reward-documents"] > 2 * result["best-shared-code-reward-documents"]
    assert set(mean) == {"fedavg-sft", "best-shared-code", "oracle", "first-L-words", "lead-1", "lead-2"}
    assert result["best-shared-code"] in {c.name for c in codes.all_codes(corpus.aspects)}
    assert len(result["methods"]["oracle"]) == 12


def test_code_steering_tells_a_writer_that_follows_codes_from_one_that_ignores_them():
    config = RunConfig().replace(**PERSONALIZE)
    corpus = load_corpus(config)
    follows = bounds(config, corpus, 6, ideal_writer(corpus.aspects))["code-steering"]
    ignores = bounds(
        config,
        corpus,
        6,
        lambda requests: [codes.target(d, codes.Code("approach", "medium")) for d, _ in requests],
    )["code-steering"]
    assert set(follows) == {c.name for c in codes.all_codes(corpus.aspects)}
    for f in follows.values():
        assert f["rougeL-own-target"] == pytest.approx(1.0)
        assert f["rougeL-other-targets"] < 0.9
        assert abs(f["words"] - f["code-words"]) < 0.5 * f["code-words"]
    short = ignores["challenge short"]
    assert short["rougeL-own-target"] < short["rougeL-other-targets"] + 0.2  # no code of its own
    assert short["words"] > 1.5 * short["code-words"]  # a medium summary when asked for a short one


def test_bounds_need_control_codes():
    config = RunConfig()
    with pytest.raises(ConfigError, match="partitioning='codes'"):
        bounds(config, load_corpus(config), 2, ideal_writer(("challenge",)))
