"""Who the simulated users are: profiles from a preset or a TOML file, checked up front.

A :class:`UserProfile` describes one user: the aspect of a paper they want summarized,
the length they like (and how strict they are about it), words they want to see or
avoid, how noisy their ratings are, and how often they bother to rate. How a user judges
a summary with it lives in :mod:`flhf_core.users.feedback`.

This module is light (no torch, no transformers) because :class:`~flhf_core.config.RunConfig`
validates ``user-profiles`` with it before a run starts: a bad profile file must stop the
launcher, not a client in the middle of a round.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flhf_core.common import ConfigError

PROFILE_PRESETS = ("aspects", "uniform", "personalize")
MIX = "+"  # a user who wants two aspects at once: "challenge+outcome"

# personalize: six groups of users, each wanting other content at another length: (aspects by
# their index in the dataset's aspects, shortest and longest preferred length in words). In
# each group of four consecutive members, the third also wants the word "paper" ("this paper
# shows ...") and the fourth wants neither "they" nor "we": preferences no control code names.
PERSONALIZE_GROUPS = (
    ((0,), 10, 14),
    ((1,), 36, 42),
    ((2,), 20, 28),
    ((0, 2), 38, 45),
    ((1, 2), 20, 28),
    ((0, 1), 38, 45),
)
PERSONALIZE_KEYWORDS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    ((), ()),
    ((), ()),
    (("paper",), ()),
    ((), ("they", "we")),
)


@dataclass(frozen=True)
class UserProfile:
    user_id: int
    aspect: str  # whose reference summary the user compares against
    length_words: int = 25  # preferred summary length
    length_tolerance: float = 10.0  # words; the width of the length preference
    include_keywords: tuple[str, ...] = ()  # words the user wants to see
    avoid_keywords: tuple[str, ...] = ()  # words the user dislikes
    rating_noise: float = 0.02  # std of the score noise (utilities are mostly below 0.4)
    rating_rate: float = 1.0  # share of summaries the user rates
    preference_temperature: float = 0.02  # Bradley-Terry scale; smaller = more decisive

    def __post_init__(self) -> None:
        checks = {
            "length_words": self.length_words > 0,
            "length_tolerance": self.length_tolerance > 0,
            "rating_noise": self.rating_noise >= 0,
            "rating_rate": 0 < self.rating_rate <= 1,
            "preference_temperature": self.preference_temperature > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"user profile {self.user_id}: invalid {', '.join(bad)} in {self}")


# What a [[user]] table may hold, and the type each field must have.
_FIELD_TYPES: dict[str, str] = {
    "aspect": "str",
    "length_words": "int",
    "length_tolerance": "float",
    "include_keywords": "words",
    "avoid_keywords": "words",
    "rating_noise": "float",
    "rating_rate": "float",
    "preference_temperature": "float",
}


def contents(aspects: Sequence[str]) -> tuple[str, ...]:
    """What a user may want: each aspect, then each pair of aspects (``challenge+outcome``)."""
    return (*aspects, *(f"{a}{MIX}{b}" for i, a in enumerate(aspects) for b in aspects[i + 1 :]))


def build_profile(user_id: int, preset: str, aspects: Sequence[str], seed: int) -> UserProfile:
    """User ``user_id``'s profile from a preset name or a TOML file path.

    ``aspects``: users differ by aspect (``user % #aspects``), preferred length (15, 25
    or 35 words, by ``user // #aspects``), rating noise and rating rate (seeded).
    ``uniform``: everyone prefers the first aspect at 25 words, rates everything.
    ``personalize``: user k is in group ``k % 6`` of :data:`PERSONALIZE_GROUPS` (an aspect or
    a mix, a range of lengths the user's length is drawn from, seeded), with the keywords of
    :data:`PERSONALIZE_KEYWORDS` by ``k // 6 % 4``, rating noise and rate as ``aspects``.
    A TOML file has ``[[user]]`` tables with UserProfile fields; user k gets table
    ``k % len(tables)``.
    """
    if preset == "uniform":
        return UserProfile(user_id, aspects[0])
    if preset == "aspects":
        rng = np.random.default_rng([seed, user_id, 7])
        return UserProfile(
            user_id,
            aspect=aspects[user_id % len(aspects)],
            length_words=(15, 25, 35)[(user_id // len(aspects)) % 3],
            rating_noise=float(rng.uniform(0.01, 0.04)),
            rating_rate=float(rng.uniform(0.6, 1.0)),
        )
    if preset == "personalize":
        if len(aspects) < 3:
            raise ConfigError(
                f"user-profiles: 'personalize' needs three aspects; the dataset has {list(aspects)}."
            )
        wanted, shortest, longest = PERSONALIZE_GROUPS[user_id % len(PERSONALIZE_GROUPS)]
        include, avoid = PERSONALIZE_KEYWORDS[
            (user_id // len(PERSONALIZE_GROUPS)) % len(PERSONALIZE_KEYWORDS)
        ]
        rng = np.random.default_rng([seed, user_id, 11])
        return UserProfile(
            user_id,
            aspect=MIX.join(aspects[i] for i in wanted),
            length_words=int(rng.integers(shortest, longest + 1)),
            include_keywords=include,
            avoid_keywords=avoid,
            rating_noise=float(rng.uniform(0.01, 0.04)),
            rating_rate=float(rng.uniform(0.6, 1.0)),
        )
    tables = _read_tables(Path(preset))
    return _profile_from_table(user_id, tables[user_id % len(tables)], Path(preset), aspects)


def check_profiles(preset: str, aspects: Sequence[str], mixes: bool = False) -> None:
    """Raise :class:`ConfigError` unless every profile ``preset`` can produce is valid; a user
    who wants a mix of aspects only where ``mixes`` (partitioning = codes derives its targets)."""
    if preset == "personalize":
        build_profile(0, preset, aspects, seed=0)  # needs three aspects
    if preset in PROFILE_PRESETS:
        if preset == "personalize" and not mixes:
            raise ConfigError(
                "user-profiles: 'personalize' users want mixes of aspects and lengths that only control "
                "codes' targets describe; use partitioning='codes' (the personalize preset)."
            )
        return
    path = Path(preset)
    for index, table in enumerate(_read_tables(path)):
        profile = _profile_from_table(index, table, path, aspects)
        if MIX in profile.aspect and not mixes:
            raise ConfigError(
                f"user-profiles: {path}, [[user]] table {index}: aspect {profile.aspect!r} is a mix, which only "
                "partitioning='codes' describes; use a single aspect or partitioning='codes'."
            )


def _read_tables(path: Path) -> list[dict[str, Any]]:
    try:
        tables = tomllib.loads(path.read_text()).get("user", [])
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(
            f"user-profiles: {str(path)!r} is neither a preset ({', '.join(PROFILE_PRESETS)}) nor a file."
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"user-profiles: {path} is not valid TOML: {error}") from None
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"user-profiles: {path} has no [[user]] tables.")
    return tables


def _profile_from_table(
    user_id: int, table: dict[str, Any], path: Path, aspects: Sequence[str]
) -> UserProfile:
    where = f"user-profiles: {path}, [[user]] table {user_id}"
    unknown = set(table) - set(_FIELD_TYPES)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {sorted(unknown)}; allowed: {sorted(_FIELD_TYPES)}.")
    if table.get("aspect") not in contents(aspects):
        raise ConfigError(
            f"{where}: aspect {table.get('aspect')!r} is not one of {list(aspects)} or a pair of them "
            f"joined by {MIX!r}."
        )
    values = {
        name: _checked(where, name, kind, table[name]) for name, kind in _FIELD_TYPES.items() if name in table
    }
    return UserProfile(user_id, **values)


def _checked(where: str, name: str, kind: str, value: Any) -> Any:
    """One field's value, of the right type and finite, or a ConfigError naming it."""
    if kind == "words":
        if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
            raise ConfigError(f"{where}: {name} must be a list of words, got {value!r}.")
        return tuple(w.lower() for w in value)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string, got {value!r}.")
        return value
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ConfigError(f"{where}: {name} must be an integer, got {value!r}.")
    if not is_number or not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}.")
    return value if kind == "int" else float(value)
