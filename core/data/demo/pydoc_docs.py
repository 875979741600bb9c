"""Python standard-library docstrings: collected in a child interpreter, formatted here."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import logging
import pkgutil
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .common import Document, SourceResult, clean_text
from .literature import split_play

logger = logging.getLogger(__name__)

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
