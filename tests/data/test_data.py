from __future__ import annotations

import json

import pytest

from flhf_core.config import ConfigError, RunConfig
from flhf_core.data import partitions
from flhf_core.data.corpus import Document, Example, load_corpus
from flhf_core.learning.batches import encode, make_batches
from flhf_core.learning.metrics import sentences_of


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(RunConfig())


def examples_of(corpus, users, config):
    return [partitions.user_partition(corpus, u, users, config) for u in range(users)]


def keys(examples):
    return {(e.doc_id, e.aspect) for e in examples}


def test_aclsum_has_250_papers_with_three_aspect_summaries(corpus):
    assert len(corpus.documents) == 250
    assert corpus.aspects == ("challenge", "approach", "outcome")
    doc = corpus.documents[0]
    assert all(doc.summary(a) for a in corpus.aspects)
    assert " ," not in doc.text and doc.text.startswith(doc.abstract[:50])


def test_sections_extend_the_document():
    short = load_corpus(RunConfig()).documents[0].text
    long = load_corpus(RunConfig(document_sections="abstract,introduction")).documents[0].text
    assert long.startswith(short) and len(long) > 2 * len(short)


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet", "preference"])
def test_partitions_are_disjoint_deterministic_and_avoid_heldout(corpus, partitioning):
    config = RunConfig(partitioning=partitioning)
    users = examples_of(corpus, 5, config)
    again = examples_of(corpus, 5, config)
    assert users == again
    heldout = {
        e.doc_id for e in partitions.heldout_examples(corpus, config.replace(**{"heldout-max-examples": 0}))
    }
    seen: set = set()
    for user in users:
        held = keys(user.train) | keys(user.validation)
        assert not held & seen, "an example is held by two users"
        assert not keys(user.train) & keys(user.validation)
        assert not {doc for doc, _ in held} & heldout
        seen |= held
    if partitioning != "preference":  # every example of a train or validation document belongs to someone
        held_by_users = (partitions.TRAIN, partitions.VALIDATION)
        total = sum(
            len(d.summaries) for d in corpus.documents if partitions.document_role(d, config) in held_by_users
        )
        assert len(seen) == total


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet", "preference"])
def test_splits_keep_the_four_kinds_of_documents_apart(corpus, partitioning):
    """splits.json's promises, for 6 users: held-out documents are nobody's; a user's train and
    validation documents never meet; reward documents are in nobody's train or feedback lists."""
    config = RunConfig(partitioning=partitioning)
    splits = json.loads(json.dumps(partitions.splits(corpus, config, 6)))  # as written to splits.json
    assert set(splits["users"]) == {str(u) for u in range(6)}
    heldout = set(splits["heldout"])
    assert heldout and all(isinstance(d, str) for d in heldout)
    users = splits["users"].values()
    trained = {d for u in users for key in ("train", "feedback") for d in u[key]}
    for user in users:
        assert not heldout & {d for key in ("train", "validation", "feedback", "reward") for d in user[key]}
        assert not set(user["train"]) & set(user["validation"])
        assert set(user["feedback"]) <= set(user["train"])
        assert len(user["reward"]) == config.reward_documents
    assert not trained & {d for u in users for d in u["reward"]}


def test_validation_is_split_by_document_not_by_example(corpus):
    """Under iid a document's aspects go to different users; none of a user's validation
    documents may be one it trains on (about 30% were, when the split was by example)."""
    config = RunConfig()
    for user in examples_of(corpus, 6, config):
        assert not {e.doc_id for e in user.train} & {e.doc_id for e in user.validation}
        assert user.validation


def test_seed_changes_the_partition(corpus):
    a = partitions.user_partition(corpus, 0, 4, RunConfig(seed=1))
    b = partitions.user_partition(corpus, 0, 4, RunConfig(seed=2))
    assert keys(a.train) != keys(b.train)


def test_iid_sizes_are_balanced_and_validation_share_holds(corpus):
    users = examples_of(corpus, 6, RunConfig())
    sizes = [len(u.train) + len(u.validation) for u in users]
    assert max(sizes) < 1.5 * min(sizes)
    share = sum(len(u.validation) for u in users) / sum(sizes)
    assert 0.12 < share < 0.28


def test_preference_users_hold_only_their_aspect(corpus):
    config = RunConfig(partitioning="preference")
    for user in examples_of(corpus, 6, config):
        assert {e.aspect for e in user.train} == {
            partitions.preferred_aspect(user.user, config, corpus.aspects)
        }


def test_preference_partitioning_follows_the_aspect_of_each_users_profile(corpus, tmp_path):
    """A profile file that gives user 0 the outcome aspect: user 0 trains on outcome summaries,
    the aspect it judges by (not aspects[0])."""
    users = tmp_path / "users.toml"
    users.write_text('[[user]]\naspect = "outcome"\n\n[[user]]\naspect = "challenge"\n')
    config = RunConfig(partitioning="preference", user_profiles=str(users))
    held = examples_of(corpus, 4, config)
    assert [{e.aspect for e in u.train} for u in held] == [{"outcome"}, {"challenge"}] * 2


def test_dirichlet_skews_aspect_mix(corpus):
    config = RunConfig(partitioning="dirichlet", dirichlet_alpha=0.1)
    mixes = []
    for user in examples_of(corpus, 6, config):
        counts = [sum(e.aspect == a for e in user.train) for a in corpus.aspects]
        if sum(counts):
            mixes.append(max(counts) / sum(counts))
    assert max(mixes) > 0.8  # some user is dominated by one aspect


def test_one_user_of_a_thousand_is_computed_without_the_others(corpus):
    part = partitions.user_partition(corpus, 999, 1000, RunConfig())
    assert len(part.train) + len(part.validation) <= 10
    with pytest.raises(ConfigError, match="partition-id 1000"):
        partitions.user_partition(corpus, 1000, 1000, RunConfig())


def test_heldout_is_capped_and_stable(corpus):
    config = RunConfig(heldout_max_examples=30)
    first = partitions.heldout_examples(corpus, config)
    assert len(first) == 30 and first == partitions.heldout_examples(corpus, config)


def test_batches_mask_target_padding(tokenizer, corpus):
    examples = partitions.user_partition(corpus, 0, 2, RunConfig()).train[:5]
    (batch,) = make_batches(tokenizer, examples, 8, 64, 16)
    assert batch.input_ids.shape[0] == 5 and batch.input_ids.shape[1] <= 64
    assert (batch.labels == -100).any() or batch.labels.shape[1] == 16
    assert (batch.labels[batch.labels != -100] != tokenizer.pad_token_id).all()


def test_batches_from_cached_token_ids_equal_the_tokenizers_own_padding(tokenizer, corpus):
    """Examples are tokenized once and padded per batch: the tensors must be exactly what
    ``tokenizer(..., padding=True)`` gives for the same examples."""
    examples = partitions.user_partition(corpus, 0, 2, RunConfig()).train[:7]
    (batch,) = make_batches(tokenizer, examples, 8, 64, 16)
    source = tokenizer(
        [e.source for e in examples], max_length=64, truncation=True, padding=True, return_tensors="pt"
    )
    target = tokenizer(
        text_target=[e.summary for e in examples],
        max_length=16,
        truncation=True,
        padding=True,
        return_tensors="pt",
    )
    assert batch.input_ids.equal(source["input_ids"]) and batch.attention_mask.equal(source["attention_mask"])
    assert batch.labels.equal(target["input_ids"].masked_fill(target["attention_mask"] == 0, -100))
    assert encode(tokenizer, examples, 64, 16).target_tokens() == int(target["attention_mask"].sum())


# --------------------------------------------------------------------------
# Local files and hub datasets
# --------------------------------------------------------------------------
ROWS = [
    {"paper": f"Document number {i}. It studies topic {i % 3}.", "tldr": f"Topic {i % 3}.", "key": f"k{i}"}
    for i in range(12)
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def local_config(dataset, **extra):
    return RunConfig.from_mapping(
        {"dataset": str(dataset), "document-field": "paper", "summary-fields": "tldr,key", **extra}
    )


def test_local_jsonl_with_field_names(tmp_path):
    corpus = load_corpus(local_config(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    assert len(corpus.documents) == 12 and corpus.aspects == ("tldr", "key")
    assert corpus.documents[3].summary("key") == "k3"


def test_local_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("paper,tldr,key\n" + "".join(f'"{r["paper"]}",{r["tldr"]},{r["key"]}\n' for r in ROWS))
    corpus = load_corpus(local_config(path))
    assert [d.summary("tldr") for d in corpus.documents] == [r["tldr"] for r in ROWS]


def test_hub_code_path_with_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:8])
    write_jsonl(folder / "test.jsonl", ROWS[8:])
    corpus = load_corpus(local_config(f"hf:{folder}"))
    assert len(corpus.documents) == 12


def test_official_split_holds_out_aclsums_100_test_papers_and_users_share_the_150_others(corpus):
    config = RunConfig()  # heldout-split = official
    heldout = set(partitions.heldout_doc_ids(corpus, config))
    official_test = {d.doc_id for d in corpus.documents if d.split == "test"}
    assert len(official_test) == 100 and heldout == official_test
    split = partitions.splits(corpus, config, 4)
    assert split["heldout-by"] == "official"
    used = {
        d for user in split["users"].values() for key in ("train", "validation", "reward") for d in user[key]
    }
    assert used and not used & official_test
    assert {corpus.by_id[d].split for d in used} == {"train", "validation"}
    # the seed deals the 150 others; it never changes which papers are held out
    assert set(partitions.heldout_doc_ids(corpus, config.replace(seed=7))) == official_test
    by_hash = config.replace(**{"heldout-split": "hash"})
    assert partitions.splits(corpus, by_hash, 4)["heldout-by"] == "hash"
    assert len(partitions.heldout_doc_ids(corpus, by_hash)) < 100


def test_the_shipped_tokenizer_never_saw_a_test_papers_words(tokenizer):
    """It was rebuilt from the official train and validation papers (every section): no word that
    only test papers use is a piece of its own."""
    import re

    corpus = load_corpus(RunConfig(document_sections="abstract,introduction,conclusion"))

    def words(docs):
        texts = [t for d in docs for t in (d.text, *dict(d.summaries).values())]
        return {w for t in texts for w in re.findall(r"[a-z]{9,}", t.lower())}

    known = words(d for d in corpus.documents if d.split != "test")
    test_only = sorted(words(d for d in corpus.documents if d.split == "test") - known)
    vocab = tokenizer.get_vocab()
    assert len(test_only) > 50 and not [w for w in test_only if "▁" + w in vocab]


def test_hub_dataset_names_its_config_and_split_and_keeps_the_official_test_split(tmp_path):
    """``hf:NAME:CONFIG:SPLIT`` through a local folder in the hub's layout (a README naming configs)."""
    folder = tmp_path / "hub_dataset"
    for config_name, rows in (("small", ROWS[:6]), ("full", ROWS)):
        write_jsonl(folder / config_name / "train.jsonl", rows[: len(rows) // 2])
        write_jsonl(folder / config_name / "test.jsonl", rows[len(rows) // 2 :])
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(
            f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
            f"  - split: test\n    path: {c}/test.jsonl\n"
            for c in ("small", "full")
        )
        + "---\n"
    )
    full = load_corpus(local_config(f"hf:{folder}:full"))
    assert len(full.documents) == 12
    assert set(partitions.heldout_doc_ids(full, RunConfig())) == {
        d.doc_id for d in full.documents if d.split == "test"
    }
    assert len(load_corpus(local_config(f"hf:{folder}:small")).documents) == 6
    train_only = load_corpus(local_config(f"hf:{folder}:full:train"))
    assert len(train_only.documents) == 6 and not any(d.split for d in train_only.documents)  # split by hash
    with pytest.raises(ConfigError, match="hf:NAME"):
        load_corpus(local_config(f"hf:{folder}:full:train:extra"))


def test_ids_that_restart_in_each_split_name_distinct_documents(tmp_path):
    folder = tmp_path / "restarting"
    write_jsonl(folder / "train.jsonl", [dict(r, id=f"{i}") for i, r in enumerate(ROWS[:6])])
    write_jsonl(folder / "test.jsonl", [dict(r, id=f"{i}") for i, r in enumerate(ROWS[6:])])
    corpus = load_corpus(local_config(f"hf:{folder}"))
    assert len(corpus.by_id) == 12
    heldout = partitions.heldout_doc_ids(corpus, RunConfig())
    assert heldout == [f"test/{i}" for i in range(6)]
    assert [corpus.by_id[d].text for d in heldout] == [r["paper"] for r in ROWS[6:]]


def test_a_dataset_of_only_test_rows_is_split_by_hash_and_split_names_are_read(tmp_path):
    from flhf_core.data.corpus import official_split_name

    folder = tmp_path / "hub"
    write_jsonl(folder / "train.jsonl", ROWS[:8])
    write_jsonl(folder / "test.jsonl", ROWS[8:])
    only_test = load_corpus(local_config(f"hf:{folder}::test"))
    assert not any(d.split for d in only_test.documents)  # not every document held out
    assert partitions.heldout_by(only_test, RunConfig()) == "hash"
    names = ["test_unseen", "test[:50]", "eval", "dev", "validation", "val", "train", "extra"]
    assert [official_split_name(n) for n in names] == ["test", "test", *["validation"] * 4, "train", "train"]


def test_a_local_files_split_column_is_its_official_split(tmp_path):
    rows = [dict(r, split="test" if i % 3 == 0 else "train") for i, r in enumerate(ROWS)]
    corpus = load_corpus(local_config(write_jsonl(tmp_path / "d.jsonl", rows)))
    heldout = partitions.heldout_doc_ids(corpus, RunConfig())
    assert heldout == [d.doc_id for i, d in enumerate(corpus.documents) if i % 3 == 0]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset: file .*absent.jsonl does not exist"):
        load_corpus(local_config(tmp_path / "absent.jsonl"))


def test_malformed_file_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"paper": "a", "tldr": "b"\nnot json\n')
    with pytest.raises(ConfigError, match=r"could not read .*broken.jsonl"):
        load_corpus(local_config(path))


def test_absent_field_names_the_field_and_the_available_ones(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ConfigError, match=r"summary-fields: field 'abstract' is not in .*key, paper, tldr"):
        load_corpus(
            RunConfig.from_mapping(
                {"dataset": str(path), "document-field": "paper", "summary-fields": "abstract"}
            )
        )


def test_missing_hub_dataset_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="could not read 'hf:"):
        load_corpus(RunConfig(dataset=f"hf:{tmp_path}/nothing-here"))


def test_extractive_baselines_per_aspect_and_the_best_of_them():
    from flhf_core.learning.metrics import baseline_scores, by_aspect, first_sentence
    from flhf_core.users.rouge import rouge

    abstract = "We study cats. We use dogs. Cats win."
    examples = [
        Example("d1", "challenge", abstract, "we study cats"),
        Example("d1", "outcome", abstract, "cats win"),
        Example("d2", "outcome", "Birds fly. Fish swim.", "fish swim"),
    ]
    documents = {
        "d1": Document("d1", abstract, abstract, ()),
        "d2": Document("d2", "Birds fly. Fish swim.", "Birds fly. Fish swim.", ()),
    }
    examples[0] = Example("d1", "challenge", "We use dogs.", "we study cats")  # what an extractor left
    assert first_sentence(abstract) == "We study cats."
    scores = baseline_scores(examples, documents, k=3)
    assert scores["baseline-first-sentence-rougeL-challenge"] == pytest.approx(100.0)
    assert scores["baseline-last-sentence-rougeL-outcome"] == pytest.approx(100.0)
    assert scores["baseline-lead3-rougeL-challenge"] == pytest.approx(100.0)  # "We study cats."
    # the best rule per aspect: first sentence (or lead-3) for challenge, last sentence for outcome
    assert scores["baseline-best-per-aspect-rougeL"] == pytest.approx(100.0)
    overall = rouge(["We study cats.", "Cats win.", "Fish swim."], [e.summary for e in examples])
    assert scores["baseline-last-sentence-rougeL"] < overall["rougeL"] == pytest.approx(100.0)
    per_aspect = by_aspect(examples, ["cats", "cats win", "nothing here"])
    assert set(per_aspect) == {"rougeL-challenge", "rougeL-outcome"}
    assert per_aspect["rougeL-outcome"] == pytest.approx(
        rouge(["cats win", "nothing here"], ["cats win", "fish swim"])["rougeL"]
    )


def test_highlight_supervision_adds_the_marked_sentences_of_training_documents_only(corpus):
    plain = RunConfig(seed=3)
    marked = RunConfig(seed=3, highlight_supervision=True)
    for user in range(2):
        before, after = (partitions.user_partition(corpus, user, 2, c) for c in (plain, marked))
        assert after.train[: len(before.train)] == before.train
        extra = after.train[len(before.train) :]
        assert len(extra) > len(before.train) / 3  # most training examples have highlights
        assert keys(extra) <= keys(before.train)  # the same documents and aspects, never others
        assert after.validation == before.validation and after.reward_doc_ids == before.reward_doc_ids
        for example in extra:
            doc = corpus.by_id[example.doc_id]
            assert example.summary != doc.summary(example.aspect)
            assert all(sentence in doc.text for sentence in sentences_of(example.summary))
            assert example.instruction == before.train[0].instruction  # the same prompt
    # highlights come from the sections the model reads: the first paper marks its challenge
    # in the introduction only
    assert corpus.documents[0].highlight("challenge") == ""
    longer = load_corpus(RunConfig(document_sections="abstract,introduction")).documents[0]
    assert longer.highlight("challenge")[:60] in longer.text[len(longer.abstract) :]


def test_highlight_supervision_needs_highlight_labels(tmp_path):
    with pytest.raises(ConfigError, match="highlight-supervision"):
        RunConfig.from_mapping({"dataset": str(tmp_path / "d.jsonl"), "highlight-supervision": True})


def test_the_aspect_prompt_names_or_asks_for_the_aspect_and_preference_stays_neutral(corpus):
    named, asked = RunConfig(seed=3), RunConfig(seed=3, aspect_prompt="question")
    before, after = (partitions.user_partition(corpus, 0, 2, c) for c in (named, asked))
    assert keys(after.train) == keys(before.train)  # the same examples, other prompts
    for plain, question in zip(before.train, after.train, strict=True):
        assert plain.source == f"{plain.aspect}: {plain.document}"
        assert question.source == f"{partitions.ASPECT_QUESTIONS[question.aspect]}: {question.document}"
    assert {e.instruction for e in partitions.heldout_examples(corpus, asked)} == set(
        partitions.ASPECT_QUESTIONS.values()
    )
    neutral = RunConfig(seed=3, aspect_prompt="question", partitioning="preference")
    assert {e.instruction for e in partitions.user_partition(corpus, 0, 2, neutral).train} == {"summarize"}
    assert (
        partitions.instruction_for(asked, "some-other-aspect") == ""
    )  # an aspect with no question: its name
