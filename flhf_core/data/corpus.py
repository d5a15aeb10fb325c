"""The corpus: documents and their reference summaries by aspect, loaded once per process.

A *corpus* is a tuple of :class:`Document` s, each with one reference summary per aspect
(for aclsum: challenge, approach, outcome; for a local or hub dataset: one aspect per name
in ``summary-fields``), read from the ``aclsum`` package, a local JSONL/JSON/CSV file, or
``hf:<name>`` through ``datasets``. An :class:`Example` is what a model trains or is judged
on: a document, an aspect and its reference summary. Who holds which document is
:mod:`flhf_core.data.partitions`'s job.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from flhf_core.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str  # what the model reads (sections joined)
    abstract: str  # for the last-sentence baseline
    summaries: tuple[tuple[str, str], ...]  # (aspect, reference summary)
    # (aspect, the sentences of ``text`` annotators highlighted for it); aclsum only
    highlights: tuple[tuple[str, str], ...] = ()
    # the dataset's own split (train, validation or test; "" where it has none): under
    # ``heldout-split = official`` its test documents are the held-out ones
    split: str = ""
    # aclsum only: ``text``'s sentences, and per aspect the indices of the highlighted ones
    sentences: tuple[str, ...] = ()
    highlighted: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def summary(self, aspect: str) -> str:
        return dict(self.summaries)[aspect]

    def highlight(self, aspect: str) -> str:
        return dict(self.highlights).get(aspect, "")


@dataclass(frozen=True)
class Example:
    doc_id: str
    aspect: str  # whose reference ``summary`` is
    document: str
    summary: str
    instruction: str = ""  # what the model is told; empty: the aspect itself

    @property
    def source(self) -> str:
        """The model input: the instruction (by default the aspect), then the document."""
        return f"{self.instruction or self.aspect}: {self.document}"


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: loaded once per process
class Corpus:
    name: str
    documents: tuple[Document, ...]
    aspects: tuple[str, ...]

    @functools.cached_property
    def by_id(self) -> dict[str, Document]:
        return {doc.doc_id: doc for doc in self.documents}


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?%)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[])\s+")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(])")


def sentences_of(text: str) -> list[str]:
    """``text`` split after ``.``, ``!`` or ``?`` where a capital, digit or bracket follows."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def detokenize(text: str) -> str:
    """Undo aclsum's tokenized spacing (``"results , as"`` -> ``"results, as"``)."""
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return _SPACE_AFTER_OPEN.sub(r"\1", text).replace(" n't", "n't")


def corpus_key(config: RunConfig) -> tuple[str, str, str, str]:
    """The run-config values that determine the corpus (the cache key)."""
    return (config.dataset, config.document_field, config.summary_fields, config.document_sections)


def load_corpus(config: RunConfig) -> Corpus:
    """Load the configured dataset (cached per process: it is immutable)."""
    return _load_corpus_cached(*corpus_key(config))


@functools.lru_cache(maxsize=4)
def _load_corpus_cached(dataset: str, document_field: str, summary_fields: str, sections: str) -> Corpus:
    if dataset == "aclsum":
        return _load_aclsum(tuple(s.strip() for s in sections.split(",")))
    fields = tuple(s.strip() for s in summary_fields.split(",") if s.strip())
    return load_table(dataset, document_field, fields)


def _load_aclsum(sections: tuple[str, ...]) -> Corpus:
    """The aclsum package's JSONL files (train, val, test), read through ``datasets``."""
    import aclsum
    import datasets

    data_dir = Path(aclsum.__file__).parent / "dataset"
    files = {split: str(data_dir / f"{split}.jsonl") for split in ("train", "val", "test")}
    rows = datasets.load_dataset("json", data_files=files)
    aspects = ("challenge", "approach", "outcome")
    documents = []
    for split in ("train", "val", "test"):
        for row in rows[split]:
            text = " ".join(sentence for s in sections for sentence in row["sentences"][s])
            marks = {
                aspect: [marked for s in sections for marked in row["highlights"][aspect][s]]
                for aspect in aspects
            }
            highlighted = {
                aspect: " ".join(
                    sentence
                    for s in sections
                    for sentence, marked in zip(
                        row["sentences"][s], row["highlights"][aspect][s], strict=True
                    )
                    if marked
                )
                for aspect in aspects
            }
            documents.append(
                Document(
                    doc_id=row["id"],
                    text=detokenize(text),
                    abstract=detokenize(" ".join(row["sentences"]["abstract"])),
                    summaries=tuple((a, row["summary"][a].strip()) for a in aspects),
                    highlights=tuple((a, detokenize(h)) for a, h in highlighted.items() if h),
                    split=official_split_name(split),
                    sentences=tuple(detokenize(x) for s in sections for x in row["sentences"][s]),
                    highlighted=tuple(
                        (a, tuple(i for i, marked in enumerate(m) if marked)) for a, m in marks.items()
                    ),
                )
            )
    return Corpus("aclsum", tuple(documents), aspects)


SPLIT_COLUMN = "split"  # a local file's column naming each row's official split (optional)


def official_split_name(name: str) -> str:
    """``train``, ``validation`` or ``test`` for a dataset's split name: ``test*`` (``test``,
    ``test_unseen``, a slice ``test[:100]``) is a test split, ``val*``, ``dev*`` and ``eval*``
    validation ones; anything else is a training split."""
    base = name.split("[", 1)[0].strip().lower()
    if base.startswith("test"):
        return "test"
    if base.startswith(("val", "dev", "eval")):
        return "validation"
    return "train"


def parse_hub_dataset(dataset: str) -> tuple[str, str | None, str | None]:
    """``hf:NAME[:CONFIG[:SPLIT]]`` -> (name or folder, config or None, split or None).

    ``hf:abisee/cnn_dailymail:3.0.0:test[:500]`` names a configuration and a split (with the
    ``datasets`` slice syntax); an empty field means the dataset's default.
    """
    name, *rest = dataset.removeprefix("hf:").split(":")
    if not name or len(rest) > 2:
        raise ConfigError(f"dataset: {dataset!r} is not hf:NAME[:CONFIG[:SPLIT]].")
    config = rest[0] if rest and rest[0] else None
    split = rest[1] if len(rest) > 1 and rest[1] else None
    return name, config, split


def _read_table(dataset: str):
    """(table, each row's official split) of a hub dataset or a local file."""
    import datasets

    if dataset.startswith("hf:"):
        name, config, split = parse_hub_dataset(dataset)
        # A hub name and a local folder in the hub's layout take the same path
        loaded = datasets.load_dataset(name, config, split=split)
        if isinstance(loaded, datasets.Dataset):  # one split was asked for
            return loaded, [official_split_name(split or "train")] * len(loaded)
        names = sorted(loaded)
        table = datasets.concatenate_datasets([loaded[s] for s in names])
        return table, [official_split_name(s) for s in names for _ in range(len(loaded[s]))]
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise ConfigError(f"dataset: file {path} does not exist.")
    builder = "csv" if path.suffix.lower() == ".csv" else "json"
    table = datasets.load_dataset(builder, data_files=str(path), split="train")
    if SPLIT_COLUMN in table.column_names:
        return table, [official_split_name(str(v or "train")) for v in table[SPLIT_COLUMN]]
    return table, [""] * len(table)


def load_table(dataset: str, document_field: str, summary_fields: tuple[str, ...]) -> Corpus:
    """A local JSONL/JSON/CSV file, or ``hf:NAME[:CONFIG[:SPLIT]]`` through ``datasets.load_dataset``.

    Each document keeps its official split: a hub dataset's split names, a local file's
    optional ``split`` column (train, validation or test); none for a file without one.
    """
    try:
        table, split_names = _read_table(dataset)
    except ConfigError:
        raise
    except Exception as error:  # datasets raises many kinds; report the file and the cause
        raise ConfigError(f"dataset: could not read {dataset!r}: {type(error).__name__}: {error}") from None

    columns = set(table.column_names)
    for key, name in [("document-field", document_field)] + [("summary-fields", f) for f in summary_fields]:
        if name not in columns:
            raise ConfigError(
                f"{key}: field {name!r} is not in {dataset!r}; its fields are {', '.join(sorted(columns))}."
            )
    ids = [str(v) for v in table["id"]] if "id" in columns else [f"row-{i}" for i in range(len(table))]
    if len(set(ids)) < len(ids):  # ids that restart in each split: told apart by their split
        ids = [f"{split or 'all'}/{doc_id}" for doc_id, split in zip(ids, split_names, strict=True)]
    if len(set(ids)) < len(ids):
        raise ConfigError(f"dataset: {dataset!r} repeats an id within a split; ids must name one row each.")
    documents = []
    for row, split, doc_id in zip(table, split_names, ids, strict=True):
        text = str(row[document_field] or "").strip()
        summaries = tuple((f, str(row[f] or "").strip()) for f in summary_fields)
        if not text or not any(s for _, s in summaries):
            continue
        documents.append(Document(doc_id, text, text, summaries, split=split))
    if len(documents) < 2:
        raise ConfigError(f"dataset: {dataset!r} has fewer than 2 usable rows.")
    tests = sum(d.split == "test" for d in documents)
    if not 0 < tests < len(documents):  # no test split, or nothing else: split by hash
        documents = [dataclasses.replace(d, split="") for d in documents]
    return Corpus(dataset, tuple(documents), summary_fields)
