"""Control codes and the generic targets they name: what a public corpus teaches on request.

A :class:`Code` asks for a summary's *content* (one aspect, or a mix of two) and its *length*
(a bucket of words). It is named ``"<content> <length>"`` (``challenge+outcome long``) and asks
for its summary with its word budget, ``"<content> =<words>"`` (``challenge+outcome =40``): a
federated model trained from scratch learns a number far better than a length word (on the
``personalize`` preset's supervised phase, asked for one aspect ``long`` rather than ``medium``,
it wrote 1 to 4 more words with the words and 15 to 17 more with the budget, on 2 seeds).
ACLSum's references are 9 to 25 words (median 22 to 24), one aspect each, so every other
code's target is derived from them, by rules a reader can check:

* ``medium`` (:data:`LENGTH_WORDS` = 25, ACLSum's cap): one aspect: its reference; a mix: each aspect's
  reference cut to half the words;
* ``short`` (12): one aspect only, its reference cut to 12 words (two aspects in 12 words
  are two fragments of six: no code asks for that);
* ``long`` (40): a mix: both references whole, joined (37 to 49 words); one aspect: its
  reference followed by the paper's own sentences the annotators highlighted for that aspect,
  cut to fill.

A cut keeps the longest prefix that ends at a clause boundary (after ``,``, ``;``, ``:``, or
before a conjunction or preposition that opens a clause) and holds at least 60% of the budget,
else the budget's first words; it ends with a full stop. The neutral request
(``summarize``) is trained on one code's target, drawn uniformly per document: the average
reader. Nothing here knows about users: their preferences are :mod:`flhf_core.users`'.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from flhf_core.data.corpus import Document, sentences_of
from flhf_core.users.feedback import judge
from flhf_core.users.profiles import MIX, UserProfile, contents

LENGTH_WORDS = {"short": 12, "medium": 25, "long": 40}  # each length code's word budget
_MIN_SHARE = 0.6  # a clause cut keeps at least this share of the budget
_CLAUSE_OPENERS = frozenset(
    [
        "and",
        "but",
        "which",
        "while",
        "whereas",
        "that",
        "by",
        "using",
        "with",
        "to",
        "for",
        "in",
        "where",
        "when",
        "so",
        "as",
        "although",
    ]
)
_TRAILING = re.compile(r"[\s,;:.\-]+$")


@dataclass(frozen=True, order=True)
class Code:
    """One request: ``content`` (an aspect, or aspects joined by ``+``) at ``length``."""

    content: str
    length: str

    @property
    def aspects(self) -> tuple[str, ...]:
        return tuple(self.content.split(MIX))

    @property
    def words(self) -> int:
        return LENGTH_WORDS[self.length]

    @property
    def name(self) -> str:
        """How results and people call it: ``challenge+outcome long``."""
        return f"{self.content} {self.length}"

    @property
    def prompt(self) -> str:
        """The instruction that asks the model for it: ``challenge+outcome =40``."""
        return f"{self.content} ={self.words}"


def lengths_of(content: str) -> tuple[str, ...]:
    """The length codes ``content`` comes in: a mix is never short."""
    return tuple(name for name in LENGTH_WORDS if MIX not in content or name != "short")


def all_codes(aspects: tuple[str, ...]) -> tuple[Code, ...]:
    return tuple(Code(content, length) for content in contents(aspects) for length in lengths_of(content))


def nearest_code(content: str, words: float) -> Code:
    """The code of ``content`` whose length is closest to ``words`` (ties: the shorter)."""
    return Code(
        content,
        min(lengths_of(content), key=lambda name: (abs(LENGTH_WORDS[name] - words), LENGTH_WORDS[name])),
    )


def cut(text: str, budget: int) -> str:
    """``text`` within ``budget`` words, ended at a clause boundary where one is near enough."""
    words = text.split()
    if len(words) <= budget:
        return text.strip()
    end = budget
    for i in range(budget, math.ceil(_MIN_SHARE * budget) - 1, -1):
        # a boundary after word i-1: it ends in punctuation, or word i opens a clause
        if words[i - 1][-1] in ",;:" or words[i].lower() in _CLAUSE_OPENERS:
            end = i
            break
    return _TRAILING.sub("", " ".join(words[:end])) + "."


def target(doc: Document, code: Code) -> str:
    """The summary of ``doc`` that ``code`` asks for ("" when a reference it needs is missing)."""
    references = [doc.summary(aspect) for aspect in code.aspects]
    if not all(references):
        return ""
    if len(references) == 1:
        (reference,) = references
        if code.length != "long":
            return cut(reference, code.words)
        return _extended(reference, _highlighted(doc, code.content), code.words)
    if code.length == "short":
        raise ValueError(f"no code asks for a short mix ({code.name})")
    if code.length == "long":
        return " ".join(r.strip() for r in references)
    share = code.words // len(references)
    return " ".join(cut(r, share) for r in references)


def _highlighted(doc: Document, aspect: str) -> str:
    """The paper's sentences highlighted for ``aspect``; where none are, the abstract sentence
    that shares the most words with the aspect's reference."""
    if doc.highlight(aspect):
        return doc.highlight(aspect)
    reference = set(doc.summary(aspect).lower().split())
    sentences = sentences_of(doc.abstract) or [doc.abstract]
    return max(sentences, key=lambda s: len(reference & set(s.lower().split())))


def _extended(reference: str, more: str, budget: int) -> str:
    remaining = budget - len(reference.split())
    if remaining < 4 or not more:
        return reference.strip()
    return f"{reference.strip()} {cut(more, remaining)}"


def preferred_code(profile: UserProfile) -> Code:
    """The code that best expresses what ``profile`` wants (its content, the nearest length);
    the user's reference for a document is that code's target."""
    return nearest_code(profile.aspect, profile.length_words)


@dataclass(frozen=True)
class SharedCodeBounds:
    """How much a user's own code is worth over one code for everyone (means over users)."""

    oracle: float  # each user served with its own code
    oracle_worst: float
    best_shared: Code  # the one code that serves everyone best
    shared: float
    best_content: str  # the one content that serves everyone best, each at the user's own length
    content_at_own_length: float

    @property
    def shared_ratio(self) -> float:
        return self.shared / self.oracle

    @property
    def content_ratio(self) -> float:
        return self.content_at_own_length / self.oracle


def shared_code_bounds(
    documents: Sequence[Document],
    profiles: Sequence[UserProfile],
    codes: Sequence[Code],
    summaries: Callable[[Document, Code], str],
) -> SharedCodeBounds:
    """Every user's mean utility over ``documents`` when served ``summaries(doc, code)`` for
    each code: its own code (the oracle), the best single code, the best single content at
    each user's own length. ``summaries = target`` measures the scenario with ideal writers."""

    def utility(profile: UserProfile, code: Code) -> float:
        own = preferred_code(profile)
        return float(np.mean([judge(profile, summaries(d, code), target(d, own)).utility for d in documents]))

    by_code = {code: [utility(p, code) for p in profiles] for code in codes}
    oracle = [utility(p, preferred_code(p)) for p in profiles]
    best_shared = max(codes, key=lambda code: np.mean(by_code[code]))
    by_content = {
        content: [utility(p, nearest_code(content, p.length_words)) for p in profiles]
        for content in dict.fromkeys(code.content for code in codes)
    }
    best_content = max(by_content, key=lambda content: np.mean(by_content[content]))
    return SharedCodeBounds(
        oracle=float(np.mean(oracle)),
        oracle_worst=float(np.min(oracle)),
        best_shared=best_shared,
        shared=float(np.mean(by_code[best_shared])),
        best_content=best_content,
        content_at_own_length=float(np.mean(by_content[best_content])),
    )
