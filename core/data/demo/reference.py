"""WordNet glosses and Debian package descriptions: parsing and formatting (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .common import Document, clean_text

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
