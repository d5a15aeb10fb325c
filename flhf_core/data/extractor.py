"""Extract, then abstract (``extractor = "highlights"``): the model reads only the sentences a
classifier picks for the requested aspect.

ACLSum's annotators marked, for each aspect, the sentences where it lives (its highlights). A
logistic regression per aspect, fitted on the highlights of the official *train* split's
papers, scores each sentence of a document; the model's input becomes the
``extract-sentences`` best-scored ones, in document order. The validation papers stay out of
the fit, so levers can still be chosen on them, and the test papers are never seen.

A train paper is read through a model fitted without it (cross-fitting over
:data:`FOLDS` folds of the train papers): fitted on its own highlights, the extractor would pick
better sentences for the papers the summarizer trains on (top-2 precision 0.62 in sample
against 0.52 on validation papers) than for any paper it is asked about later.

Features of a sentence: hashed word unigrams and bigrams (a bag of cue phrases: "we propose",
"outperforms", "however"), scaled to unit length, and where it sits in the document (five
bins of its relative position, first, second and last). The model per aspect is

    p(highlighted | sentence) = sigmoid(w_aspect . x(sentence)),

fitted by full-batch gradient descent on the mean log-loss plus an L2 penalty. Pure numpy,
deterministic, about a second on the 100 train papers, so it is fitted when first needed
rather than shipped as a file (no weights to go stale against the corpus).

Extractive summarization as a first stage: Chen & Bansal 2018 (https://arxiv.org/abs/1805.11080),
Pilault et al. 2020; ACLSum: Takeshita et al. 2024 (https://arxiv.org/abs/2403.05303).
"""

from __future__ import annotations

import functools
import itertools
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flhf_core.data.corpus import Corpus, Document

VERSION = 1  # bump when the features, the fit or the folds change: cached extracted sources go stale
HASH_DIMENSIONS = 2**12  # buckets of the hashed n-grams (collisions are rare at ~600 sentences)
POSITION_FEATURES = 9  # five relative-position bins, first, second, last, a bias
L2 = 1e-4  # penalty on the weights (chosen on the official validation papers: 1e-2..1e-4)
STEPS = 800  # gradient steps
STEP_SIZE = 0.5  # gradient step size (the features are at most unit length: stable)
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Features:
    """Sentences' features as a sparse matrix (row, column, value triples): a sentence has a
    few dozen of its 4,105 features set, so products cost the nonzeros, not rows x columns."""

    rows: np.ndarray
    columns: np.ndarray
    values: np.ndarray
    shape: tuple[int, int]

    def __matmul__(self, w: np.ndarray) -> np.ndarray:
        return np.bincount(self.rows, weights=self.values * w[self.columns], minlength=self.shape[0])

    def transpose_times(self, g: np.ndarray) -> np.ndarray:
        return np.bincount(self.columns, weights=self.values * g[self.rows], minlength=self.shape[1])

    def dense(self) -> np.ndarray:
        x = np.zeros(self.shape)
        np.add.at(x, (self.rows, self.columns), self.values)
        return x

    @staticmethod
    def stack(parts: Sequence[Features]) -> Features:
        offsets = np.cumsum([0] + [f.shape[0] for f in parts])
        return Features(
            np.concatenate([f.rows + o for f, o in zip(parts, offsets, strict=False)]),
            np.concatenate([f.columns for f in parts]),
            np.concatenate([f.values for f in parts]),
            (int(offsets[-1]), parts[0].shape[1]),
        )


def sentence_features(sentences: Sequence[str]) -> Features:
    """One row of features per sentence of a document (see the module's docstring)."""
    n = len(sentences)
    rows, columns, values = [], [], []
    for i, sentence in enumerate(sentences):
        words = _WORD.findall(sentence.lower())
        grams = words + [f"{a}_{b}" for a, b in itertools.pairwise(words)]
        buckets = sorted({zlib.crc32(gram.encode()) % HASH_DIMENSIONS for gram in grams})
        position = HASH_DIMENSIONS
        where = [position + min(4, int(5 * i / max(1, n - 1))), position + 8]
        where += [position + k for k, on in ((5, i == 0), (6, i == 1), (7, i == n - 1)) if on]
        rows += [i] * (len(buckets) + len(where))
        columns += buckets + where
        values += [1.0 / max(1.0, np.sqrt(len(buckets)))] * len(buckets) + [1.0] * len(where)
    return Features(
        np.asarray(rows, dtype=np.int64),
        np.asarray(columns, dtype=np.int64),
        np.asarray(values),
        (n, HASH_DIMENSIONS + POSITION_FEATURES),
    )


def fit_logistic(x: Features, y: np.ndarray, l2: float = L2, steps: int = STEPS) -> np.ndarray:
    """Weights minimizing mean log-loss + l2/2 |w|^2, by full-batch gradient descent."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        w -= STEP_SIZE * (x.transpose_times(p - y) / len(y) + l2 * w)
    return w


@dataclass(frozen=True)
class SentenceExtractor:
    weights: dict[str, np.ndarray]  # aspect -> logistic-regression weights

    @classmethod
    def fit(cls, documents: Sequence[Document], aspects: Sequence[str]) -> SentenceExtractor:
        """One classifier per aspect on the documents' highlighted sentences."""
        documents = [d for d in documents if d.sentences]
        if not documents:
            raise ValueError("no documents with sentences to fit the extractor on")
        x = Features.stack([sentence_features(d.sentences) for d in documents])
        weights = {}
        for aspect in aspects:
            marked = [set(dict(d.highlighted).get(aspect, ())) for d in documents]
            y = np.array(
                [i in m for d, m in zip(documents, marked, strict=True) for i in range(len(d.sentences))]
            )
            weights[aspect] = fit_logistic(x, y.astype(float))
        return cls(weights)

    def scores(self, sentences: Sequence[str], aspect: str) -> np.ndarray:
        """Each sentence's logit of being highlighted for ``aspect``."""
        return sentence_features(sentences) @ self.weights[aspect]

    def extract(self, sentences: Sequence[str], aspect: str, count: int) -> str:
        """The ``count`` best-scored sentences for ``aspect``, in document order."""
        if not sentences:
            return ""
        best = np.argsort(-self.scores(sentences, aspect), kind="stable")[:count]
        return " ".join(sentences[i] for i in sorted(best.tolist()))


FOLDS = 5  # cross-fitting folds of the train papers


@dataclass(frozen=True)
class CrossFittedExtractor:
    """One extractor for papers outside the train split, and one per fold for the train papers."""

    full: SentenceExtractor  # fitted on every train paper
    folds: tuple[SentenceExtractor, ...]  # fold k's: fitted on the train papers outside fold k
    fold_of: dict[str, int]  # train paper id -> its fold

    def extract(self, doc: Document, aspect: str, count: int) -> str:
        """The sentences of ``doc`` picked for ``aspect`` by a model that never saw its highlights."""
        fold = self.fold_of.get(doc.doc_id)
        model = self.full if fold is None else self.folds[fold]
        return model.extract(doc.sentences, aspect, count)


@functools.lru_cache(maxsize=4)
def train_split_extractor(corpus: Corpus) -> CrossFittedExtractor:
    """The extractor fitted on the highlights of the corpus's official train papers only."""
    train = sorted((d for d in corpus.documents if d.split == "train"), key=lambda d: d.doc_id)
    fold_of = {d.doc_id: i % FOLDS for i, d in enumerate(train)}
    folds = tuple(
        SentenceExtractor.fit([d for d in train if fold_of[d.doc_id] != k], corpus.aspects)
        for k in range(FOLDS)
    )
    return CrossFittedExtractor(SentenceExtractor.fit(train, corpus.aspects), folds, fold_of)
