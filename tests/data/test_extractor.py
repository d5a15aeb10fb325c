"""``extractor = "highlights"``: the model reads the sentences a classifier fitted on the official
train papers' highlights picks for the requested aspect."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from flhf_core.config import ConfigError, RunConfig
from flhf_core.data import partitions
from flhf_core.data.corpus import Document, load_corpus
from flhf_core.data.extractor import SentenceExtractor, sentence_features, train_split_extractor

EXTRACTING = RunConfig(extractor="highlights", extract_sentences=2)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(RunConfig())


def paper(doc_id: str, sentences: list[str], outcome: int) -> Document:
    return Document(
        doc_id,
        " ".join(sentences),
        " ".join(sentences),
        (("outcome", "x"),),
        sentences=tuple(sentences),
        highlighted=(("outcome", (outcome,)),),
        split="train",
    )


def test_the_extractor_learns_the_cue_words_of_an_aspect_wherever_the_sentence_sits():
    filler = ["We study a problem of parsing.", "Prior work is slow.", "We build a model."]
    rng = np.random.default_rng(0)
    papers = []
    for i in range(40):  # the outcome sentence ("... outperforms ...") anywhere in the paper
        where = int(rng.integers(0, 4))
        sentences = [*filler]
        sentences.insert(where, f"Our system outperforms baseline {i}.")
        papers.append(paper(f"p{i}", sentences, where))
    extractor = SentenceExtractor.fit(papers, ["outcome"])
    new = ["It clearly outperforms older parsers.", "We study a problem of parsing.", "We build a model."]
    assert extractor.extract(new, "outcome", 1) == new[0]
    # two sentences come back in document order, whichever scored higher
    assert extractor.extract(new[::-1], "outcome", 2).endswith(new[0])


def test_sparse_features_multiply_as_their_dense_matrix():
    x = sentence_features(["We propose a parser.", "It works, it works.", ""])
    w = np.random.default_rng(0).normal(size=x.shape[1])
    g = np.random.default_rng(1).normal(size=x.shape[0])
    np.testing.assert_allclose(x @ w, x.dense() @ w)
    np.testing.assert_allclose(x.transpose_times(g), x.dense().T @ g)
    assert np.isclose(np.linalg.norm(x.dense()[0, :4096]), 1.0)  # n-grams at unit length


def test_it_is_fitted_on_the_official_train_papers_alone_and_each_reads_through_another_fold(corpus):
    train = sorted((d for d in corpus.documents if d.split == "train"), key=lambda d: d.doc_id)
    assert 0 < len(train) < len(corpus.documents)
    fitted = train_split_extractor(corpus)
    for aspect in corpus.aspects:
        np.testing.assert_array_equal(
            fitted.full.weights[aspect], SentenceExtractor.fit(train, corpus.aspects).weights[aspect]
        )
    paper = train[7]
    fold = fitted.fold_of[paper.doc_id]
    outside = SentenceExtractor.fit([d for d in train if fitted.fold_of[d.doc_id] != fold], corpus.aspects)
    np.testing.assert_array_equal(fitted.folds[fold].weights["outcome"], outside.weights["outcome"])
    assert paper.doc_id not in {d.doc_id for d in train if fitted.fold_of[d.doc_id] != fold}
    in_sample = [fitted.full.extract(d.sentences, "approach", 2) for d in train]
    cross_fitted = [fitted.extract(d, "approach", 2) for d in train]
    assert in_sample != cross_fitted  # the train papers are not read through the model fitted on them
    test_paper = next(d for d in corpus.documents if d.split == "test")
    assert fitted.extract(test_paper, "approach", 2) == fitted.full.extract(
        test_paper.sentences, "approach", 2
    )


def test_every_role_reads_the_extracted_sentences_and_the_rules_the_whole_paper(corpus):
    heldout = partitions.heldout_examples(corpus, EXTRACTING)
    user = partitions.user_partition(corpus, 0, 2, EXTRACTING)
    for example in (*heldout[:6], *user.train[:6], *user.validation[:6]):
        doc = corpus.by_id[example.doc_id]
        pairs = {" ".join(pair) for pair in itertools.combinations(doc.sentences, 2)}
        assert example.document in pairs, example  # two of its sentences, in document order
        assert example.source == f"{example.aspect}: {example.document}"
    aspects = {e.aspect: e.document for e in heldout if e.doc_id == heldout[0].doc_id}
    assert len(set(aspects.values())) > 1  # each aspect reads its own sentences
    plain = partitions.heldout_examples(corpus, RunConfig(extractor="none"))
    assert plain[0].document == corpus.by_id[plain[0].doc_id].text


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"heldout-split": "hash"}, "heldout-split='official'"),
        ({"partitioning": "preference"}, "partitioning='preference'"),
        ({"dataset": "data.jsonl"}, "has none"),
    ],
)
def test_the_extractor_refuses_what_it_cannot_serve(changes, named):
    with pytest.raises(ConfigError, match=f"extractor: .*{named}"):
        RunConfig.from_mapping({"extractor": "highlights", **changes})


def test_flhf_summarize_reads_a_text_as_the_runs_model_was_trained_to(
    tmp_path, monkeypatch, tiny_model, tokenizer, smoke_config
):
    import json

    from flhf_core.learning import generate
    from flhf_core.runs import cli

    run_dir = tmp_path / "run"
    tiny_model.save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    config = smoke_config.replace(extractor="highlights", **{"extract-sentences": 1})
    (run_dir / "config.json").write_text(json.dumps(config.to_mapping()))
    text = tmp_path / "paper.txt"
    text.write_text(
        "Parsing long sentences is hard. We propose a parser. It outperforms the baseline by 2 points."
    )
    asked = []
    monkeypatch.setattr(generate, "summarize", lambda m, t, sources, c: asked.extend(sources) or ["ok"])
    assert cli.main(["summarize", str(run_dir), str(text), "--aspect", "outcome"]) == 0
    assert cli.main(["summarize", str(run_dir), str(text)]) == 0
    outcome, neutral = asked
    assert outcome.startswith("outcome: ") and outcome.count(".") == 1  # one sentence of three
    assert neutral.endswith("by 2 points.")  # a neutral request reads the whole text


def test_auto_extracts_on_aclsums_official_split_where_prompts_name_the_aspect():
    assert RunConfig().extractor == "auto" and RunConfig().extracts
    for elsewhere in ({"heldout-split": "hash"}, {"partitioning": "preference"}, {"dataset": "d.jsonl"}):
        assert not RunConfig.from_mapping(elsewhere).extracts, elsewhere
    assert not RunConfig(extractor="none").extracts
