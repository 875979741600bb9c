"""Shared pieces of the demo corpus builder: documents, budgets, text cleaning and the split."""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SOURCE_NAMES: tuple[str, ...] = ("shakespeare", "wordnet", "debian", "pydoc", "fortunes")

# Character budgets per source (None: keep everything). Overshooting sources are cut by a
# seeded, id-hash-ranked subsample, so the choice is stable for a given seed.
CHAR_BUDGETS: dict[str, int | None] = {
    "shakespeare": None,
    "wordnet": 4_500_000,
    "debian": 4_500_000,
    "pydoc": 3_000_000,
    "fortunes": None,
}

SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_TEXTS = "shksprdata/texts"
WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")

VALIDATION_FRACTION = 0.02
MIN_VALIDATION_DOCUMENTS = 200
MAX_VALIDATION_FRACTION = 0.07


@dataclass(frozen=True)
class Document:
    """One corpus document.

    Attributes:
        id: unique, stable, human-readable id, ``<source>/...``.
        text: cleaned text.
        source: one of :data:`SOURCE_NAMES`.
    """

    id: str
    text: str
    source: str


@dataclass
class SourceResult:
    """The documents of one source and what is known about where they came from."""

    name: str
    documents: list[Document]
    provenance: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Text cleaning (pure)
# --------------------------------------------------------------------------------------

_OVERSTRIKE = re.compile(r"[^\n]\x08")
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
_MOJIBAKE = re.compile(r"[\xc2-\xf4][\x80-\xbf]{1,3}")


def _undo_latin1(match: re.Match[str]) -> str:
    """Decode one Latin-1-rendered UTF-8 sequence, or leave it as it was."""
    try:
        return match.group().encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return match.group()


def fix_mojibake(text: str, max_passes: int = 3) -> str:
    """Repair UTF-8 that was decoded as Latin-1 (``donâ\x80\x99t`` -> ``don’t``, ``Â£`` -> ``£``).

    Only runs of characters that form valid UTF-8 when encoded as Latin-1 are replaced,
    up to ``max_passes`` times for text encoded more than once.
    """
    for _ in range(max_passes):
        fixed = _MOJIBAKE.sub(_undo_latin1, text)
        if fixed == text:
            break
        text = fixed
    return text


def clean_text(text: str) -> str:
    """Normalise a text for the corpus.

    NFC-normalises, turns CRLF/CR (and Unicode line/paragraph separators) into ``\\n``,
    resolves terminal overstriking (``_\\bX`` and ``X\\bX`` become ``X``), removes ANSI
    escapes, repairs doubly encoded UTF-8 (:func:`fix_mojibake`), removes every other
    control character except newline and tab, strips trailing whitespace from each line,
    collapses runs of two or more blank lines into one and drops leading and trailing
    blank lines.

    Args:
        text: raw text.

    Returns:
        The cleaned text (possibly empty).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    while "\x08" in text:
        new = _OVERSTRIKE.sub("", text)
        if new == text:
            break
        text = new
    text = _ANSI_ESCAPE.sub("", text)
    text = fix_mojibake(text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    text = text.replace("\ufeff", "")
    text = unicodedata.normalize("NFC", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip("\n")


# --------------------------------------------------------------------------------------
# Split and subsampling (pure)
# --------------------------------------------------------------------------------------


def id_hash_fraction(doc_id: str, salt: str = "") -> float:
    """Map an id (and an optional salt) to a fixed number in [0, 1) via sha256."""
    digest = hashlib.sha256(f"{salt}{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def validation_fraction_for(
    n_documents: int,
    base: float = VALIDATION_FRACTION,
    min_documents: int = MIN_VALIDATION_DOCUMENTS,
    max_fraction: float = MAX_VALIDATION_FRACTION,
) -> float:
    """The share of a source's documents held out for validation.

    ``base`` (2%) normally; raised towards ``min_documents`` held-out documents for small
    sources, but never above ``max_fraction``.

    Args:
        n_documents: documents in the source.
        base: the usual fraction.
        min_documents: held-out documents wanted at least.
        max_fraction: upper bound on the fraction.

    Returns:
        The fraction in [base, max(base, max_fraction)].
    """
    if n_documents <= 0:
        return base
    return max(base, min(max_fraction, min_documents / n_documents))


def is_validation(doc_id: str, fraction: float) -> bool:
    """Whether a document belongs to the validation split (sha256 of its id < fraction)."""
    return id_hash_fraction(doc_id) < fraction


def split_documents(documents: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """Split documents by id hash into train and validation, per source.

    Each source gets :func:`validation_fraction_for` of its document count, so the split
    of a document depends only on its id and its source's size, never on order or seed.

    Args:
        documents: documents of one or more sources.

    Returns:
        ``(train, validation)`` in the input order.
    """
    counts: dict[str, int] = {}
    for doc in documents:
        counts[doc.source] = counts.get(doc.source, 0) + 1
    fractions = {src: validation_fraction_for(n) for src, n in counts.items()}
    train: list[Document] = []
    validation: list[Document] = []
    for doc in documents:
        (validation if is_validation(doc.id, fractions[doc.source]) else train).append(doc)
    return train, validation


def subsample_to_budget(documents: Sequence[Document], max_chars: int | None, seed: int) -> list[Document]:
    """Keep a seeded, deterministic subset of documents totalling at most ``max_chars``.

    Documents are ranked by sha256 of ``seed`` and id; the best ranked are kept while they
    fit, and the kept ones are returned in their original order.

    Args:
        documents: candidate documents.
        max_chars: character budget, or None to keep everything.
        seed: subsampling seed.

    Returns:
        The kept documents.
    """
    if max_chars is None or sum(len(d.text) for d in documents) <= max_chars:
        return list(documents)
    ranked = sorted(range(len(documents)), key=lambda i: id_hash_fraction(documents[i].id, salt=f"{seed}:"))
    keep: set[int] = set()
    total = 0
    for i in ranked:
        n = len(documents[i].text)
        if total + n > max_chars:
            continue
        keep.add(i)
        total += n
    return [d for i, d in enumerate(documents) if i in keep]
