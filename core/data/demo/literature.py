"""Shakespeare's plays and Debian's fortunes: parsing and document splitting (pure)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .common import Document, clean_text

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
