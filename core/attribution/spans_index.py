"""The span index: a suffix array over the training tokens, for exact-span attribution
(:mod:`core.attribution.spans`).

Every training document (split as :func:`core.data.corpus.load_corpus` splits it) is
tokenised with the bundle's tokenizer, as packing does, and the documents are concatenated,
each followed by one separator id (the tokenizer's size, which no text tokenises to). A query
pattern holds text tokens only, so an occurrence of it never crosses a separator: every match
lies inside one document. The suffix array (pydivsufsort) orders all suffixes of that sequence;
the occurrences of a pattern are one contiguous range of it, found by binary search, one
pattern token at a time.

Stored in ``BUNDLE/index/spans.safetensors`` (listed in the index's ``meta.json``)::

    tokens (N,) int32            the documents' tokens, each document followed by the separator
    suffix_array (N,) int64      start of each suffix of ``tokens``, in lexicographic order
    doc_starts (D + 1,) int64    document d is tokens[doc_starts[d] : doc_starts[d + 1] - 1]
    text, text_starts            UTF-8 bytes (uint8) of the documents' texts, and offsets (D + 1,)
    ids, id_starts               the corpus rows' ids, likewise
    sources, source_starts       their sources, likewise

Document d is row d of the training split (an example's ``doc_index``). The texts are kept so
that a snippet needs neither the corpus nor the neighbourhood index. The header's metadata
holds the build record (``meta``): format, model and corpus fingerprints, separator, counts.
"""

from __future__ import annotations

import bisect
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from core.errors import PrototypeIndexError
from core.index.format import META_FILE, index_dir, register_index_file
from core.store import read_json, read_safetensors, rebuild_hint, write_safetensors

FORMAT_VERSION = 1
SPANS_FILE = "spans.safetensors"
_GATHER_BELOW = 4096  # ranges narrower than this are searched with one vectorised gather


def _pack_strings(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes (uint8) of the strings end to end, and their (len + 1,) int64 offsets."""
    encoded = [s.encode("utf-8") for s in strings]
    starts = np.zeros(len(encoded) + 1, dtype=np.int64)
    starts[1:] = np.cumsum([len(b) for b in encoded])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), starts


def _unpack_strings(data: np.ndarray, starts: np.ndarray) -> list[str]:
    raw = data.tobytes()
    bounds = starts.tolist()
    return [raw[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass
class SpanMatches:
    """Per (start, document): the longest span ``sequence[start : start + length]`` that the
    document contains, and where (all (E,) int64).

    Attributes:
        start: start of the span in the query sequence.
        length: its length in tokens.
        doc: the document (row of the training split).
        occurrence: position in the span index's ``tokens`` of the document's first
            occurrence of that span.
    """

    start: np.ndarray
    length: np.ndarray
    doc: np.ndarray
    occurrence: np.ndarray


@dataclass
class SpanIndex:
    """A loaded span index (see the module docstring for the arrays).

    Read-only once loaded, like the prototype index it sits beside.
    """

    path: Path
    meta: dict
    tokens: np.ndarray
    suffix_array: np.ndarray
    doc_starts: np.ndarray
    text: np.ndarray
    text_starts: np.ndarray
    doc_ids: list[str]
    sources: list[str]

    @property
    def separator(self) -> int:
        """The id after every document: the tokenizer's size, above every text token."""
        return int(self.meta["separator"])

    @property
    def model_fingerprint(self) -> str:
        return self.meta["model_fingerprint"]

    @property
    def corpus_fingerprint(self) -> str:
        return self.meta["corpus_fingerprint"]

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1

    def document_text(self, doc: int) -> str:
        """The text of document ``doc`` (row of the training split)."""
        return self.text[self.text_starts[doc] : self.text_starts[doc + 1]].tobytes().decode("utf-8")

    def document_tokens(self, doc: int) -> np.ndarray:
        """(n,) int32 tokens of document ``doc``, without its separator."""
        return self.tokens[self.doc_starts[doc] : self.doc_starts[doc + 1] - 1]

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        """(n,) document of each (n,) position in ``tokens``."""
        return np.searchsorted(self.doc_starts, positions, side="right") - 1

    def extend(self, lo: int, hi: int, depth: int, token: int) -> tuple[int, int]:
        """Narrow the suffix-array range [lo, hi) of a pattern of ``depth`` tokens to the
        suffixes whose next token is ``token``: the range of the pattern + [token].

        Within the range every suffix shares the pattern, so their tokens at ``depth`` are
        sorted; a range too wide to gather is bisected one suffix at a time.
        """
        if not 0 <= token < self.separator or lo >= hi:
            return lo, lo
        tokens, sa = self.tokens, self.suffix_array
        if hi - lo <= _GATHER_BELOW:
            column = tokens[sa[lo:hi] + depth]  # (hi - lo,) sorted
            return lo + int(np.searchsorted(column, token, "left")), lo + int(np.searchsorted(column, token, "right"))

        def key(r: int) -> int:
            return int(tokens[sa[r] + depth])

        span = range(lo, hi)
        first = lo + bisect.bisect_left(span, token, key=key)
        return first, lo + bisect.bisect_right(span, token, lo=first - lo, key=key)

    def find(self, pattern: list[int] | np.ndarray) -> np.ndarray:
        """(n,) sorted positions in ``tokens`` where ``pattern`` (text tokens, >= 1) occurs."""
        lo, hi = 0, len(self.suffix_array)
        for depth, token in enumerate(pattern):
            lo, hi = self.extend(lo, hi, depth, int(token))
        return np.sort(self.suffix_array[lo:hi]) if len(pattern) else np.zeros(0, dtype=np.int64)

    def documents_containing(self, pattern: list[int] | np.ndarray) -> np.ndarray:
        """(n,) sorted documents (rows of the training split) that contain ``pattern``."""
        return np.unique(self.document_of(self.find(pattern)))

    def longest_matches(self, sequence: list[int], min_length: int = 1, reach: int = 0) -> SpanMatches:
        """For every start i of ``sequence`` and every document: the longest span
        ``sequence[i : i + length]`` the document contains, kept when ``length >= min_length``
        and the span ends after ``reach`` (``i + length > reach``: it covers a token at
        ``reach`` or later).

        Ties between occurrences inside a document go to the first occurrence.
        """
        parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        size = len(self.suffix_array)
        for i in range(len(sequence)):
            bounds: list[tuple[int, int]] = []  # bounds[k - 1]: range of sequence[i : i + k]
            lo, hi = 0, size
            for k in range(i, len(sequence)):
                lo, hi = self.extend(lo, hi, k - i, int(sequence[k]))
                if lo == hi:
                    break
                bounds.append((lo, hi))
            longest = len(bounds)
            if longest < min_length or i + longest <= reach:
                continue
            base, top = bounds[min_length - 1]
            # Each suffix's match length: the ranges of longer spans nest inside shorter ones.
            length = np.full(top - base, min_length, dtype=np.int64)  # (n,)
            for k in range(min_length + 1, longest + 1):
                a, b = bounds[k - 1]
                length[a - base : b - base] = k
            occurrence = self.suffix_array[base:top].astype(np.int64)  # (n,)
            keep = i + length > reach
            length, occurrence = length[keep], occurrence[keep]
            doc = self.document_of(occurrence)
            order = np.lexsort((occurrence, -length, doc))  # per document: longest, then first
            first = order[np.r_[True, doc[order][1:] != doc[order][:-1]]]
            parts.append((i, length[first], doc[first], occurrence[first]))
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return SpanMatches(empty, empty, empty, empty)
        return SpanMatches(
            np.concatenate([np.full(len(p[1]), p[0], dtype=np.int64) for p in parts]),
            *(np.concatenate([p[j] for p in parts]).astype(np.int64) for j in (1, 2, 3)),
        )


# ----------------------------------------------------------------------------- build


def build_spans(bundle_dir: str | Path, corpus_path: str | Path, *, show_progress: bool = True) -> dict:
    """Build ``bundle_dir/index/spans.safetensors``: the training documents' tokens and their
    suffix array, and list it in the index's ``meta.json``.

    Args:
        bundle_dir: an indexed PRISM bundle (:func:`core.index.build.build_index` ran).
        corpus_path: the corpus the index was built from.
        show_progress: a progress bar over the documents while they are tokenised.

    Returns:
        a summary: documents, tokens, ``spans_bytes`` / ``spans_mb``, ``build_seconds``.

    Raises:
        PrototypeIndexError: the bundle has no index, or one built from another corpus.
        CorpusError, BundleError: the corpus or the bundle cannot be read.
    """
    from pydivsufsort import divsufsort
    from tqdm.auto import tqdm

    from core.bundle import load_bundle
    from core.data.corpus import load_corpus

    t0 = time.time()
    bundle_dir = Path(bundle_dir)
    folder = index_dir(bundle_dir)
    hint = rebuild_hint(bundle_dir, corpus_path)
    index_meta = read_json(
        folder / META_FILE, "the index metadata", f"build the index with {hint}", PrototypeIndexError
    )
    corpus = load_corpus(corpus_path)
    if not isinstance(index_meta, dict) or index_meta.get("corpus_fingerprint") != corpus.fingerprint:
        raise PrototypeIndexError(
            f"the index in {folder} was built from another corpus than {corpus_path}; rebuild both with {hint}"
        )
    bundle = load_bundle(bundle_dir)
    tokenizer = bundle.tokenizer
    separator = len(tokenizer)  # one past the largest id the tokenizer produces

    train = corpus.train
    pieces: list[np.ndarray] = []
    texts: list[str] = []
    ids: list[str] = []
    sources: list[str] = []
    sep = np.array([separator], dtype=np.int32)
    batch = 1000
    with tqdm(total=len(train), desc="tokenising spans", unit="doc", disable=not show_progress) as bar:
        for start in range(0, len(train), batch):
            rows = train[start : start + batch]
            encoded = tokenizer(rows["text"], add_special_tokens=False, verbose=False)["input_ids"]
            for token_ids in encoded:
                pieces += [np.asarray(token_ids, dtype=np.int32), sep]
            texts += rows["text"]
            ids += rows["id"]
            sources += rows["source"]
            bar.update(len(rows["text"]))
    lengths = np.array([len(p) for p in pieces[0::2]], dtype=np.int64) + 1  # (D,) with the separator
    doc_starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    doc_starts[1:] = np.cumsum(lengths)
    tokens = np.concatenate(pieces)  # (N,) int32
    del pieces
    suffix_array = np.asarray(divsufsort(tokens), dtype=np.int64)  # (N,)
    text, text_starts = _pack_strings(texts)
    id_bytes, id_starts = _pack_strings(ids)
    source_bytes, source_starts = _pack_strings(sources)
    meta = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_fingerprint": bundle.fingerprint,
        "corpus_fingerprint": corpus.fingerprint,
        "corpus_path": str(corpus_path),
        "separator": separator,
        "documents": len(texts),
        "tokens": int(len(tokens) - len(texts)),
        "build_seconds": round(time.time() - t0, 3),
    }
    arrays = {
        "tokens": tokens,
        "suffix_array": suffix_array,
        "doc_starts": doc_starts,
        "text": text,
        "text_starts": text_starts,
        "ids": id_bytes,
        "id_starts": id_starts,
        "sources": source_bytes,
        "source_starts": source_starts,
    }
    write_safetensors(folder / SPANS_FILE, arrays, metadata={"meta": json.dumps(meta)})
    summary = {k: meta[k] for k in ("documents", "tokens", "build_seconds")}
    register_index_file(folder, SPANS_FILE, spans=summary)
    size = (folder / SPANS_FILE).stat().st_size
    return {"path": str(folder / SPANS_FILE), **summary, "spans_bytes": size, "spans_mb": round(size / 2**20, 3)}


# ------------------------------------------------------------------------------ load


def spans_exist(bundle_dir: str | Path) -> bool:
    """True when the bundle's index holds a span index (it may still be stale)."""
    return (index_dir(bundle_dir) / SPANS_FILE).is_file()


def _header(path: Path, fix: str) -> dict:
    """The build record in the file's safetensors header, read without the arrays."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise PrototypeIndexError(f"the span index {path} is not readable ({err}); {fix}") from None
    if not isinstance(meta, dict):
        raise PrototypeIndexError(f"the span index {path} has no build record; {fix}")
    return meta


ARRAYS = ("tokens", "suffix_array", "doc_starts", "text", "text_starts", "ids", "id_starts", "sources", "source_starts")


def _check_arrays(path: Path, arrays: dict[str, np.ndarray], fix: str) -> None:
    """Refuse arrays that do not fit together (a file cut short, or one from another build)."""
    missing = [name for name in ARRAYS if name not in arrays]
    if missing:
        raise PrototypeIndexError(f"the span index {path} lacks {', '.join(missing)}; {fix}")
    n, starts = len(arrays["tokens"]), arrays["doc_starts"]
    fits = len(arrays["suffix_array"]) == n and len(starts) >= 1 and int(starts[-1]) == n
    for data, offsets in (("text", "text_starts"), ("ids", "id_starts"), ("sources", "source_starts")):
        fits &= len(arrays[offsets]) == len(starts) and int(arrays[offsets][-1]) == len(arrays[data])
    if not fits:
        raise PrototypeIndexError(f"the span index {path} has arrays that do not fit together; {fix}")


def load_spans(bundle_dir: str | Path) -> SpanIndex:
    """Load a bundle's span index after checking that it belongs to its weights and index.

    Raises:
        PrototypeIndexError: no span index, an unreadable, unknown-format or inconsistent one, or
            one built for other weights or from another corpus than the index.
    """
    from core.bundle import model_fingerprint

    bundle_dir = Path(bundle_dir)
    folder = index_dir(bundle_dir)
    path = folder / SPANS_FILE
    if not path.is_file():
        raise PrototypeIndexError(f"{bundle_dir} has no span index; build it with {rebuild_hint(bundle_dir)}")
    meta = _header(path, f"rebuild it with {rebuild_hint(bundle_dir)}")
    fix = f"rebuild it with {rebuild_hint(bundle_dir, meta.get('corpus_path', 'PATH'))}"
    if meta.get("format_version") != FORMAT_VERSION:
        raise PrototypeIndexError(
            f"the span index {path} has format {meta.get('format_version')!r}, this version reads "
            f"{FORMAT_VERSION}; {fix}"
        )
    current = model_fingerprint(bundle_dir)
    if meta.get("model_fingerprint") != current:
        raise PrototypeIndexError(
            f"the span index {path} was built for model {meta.get('model_fingerprint')}, not this model "
            f"({current}); {fix}"
        )
    index_meta = read_json(folder / META_FILE, "the index metadata", fix, PrototypeIndexError)
    index_meta = index_meta if isinstance(index_meta, dict) else {}
    if index_meta.get("corpus_fingerprint") != meta.get("corpus_fingerprint"):
        raise PrototypeIndexError(
            f"the span index {path} was built from another corpus than the index; rebuild both with "
            f"{rebuild_hint(bundle_dir, index_meta.get('corpus_path', 'PATH'))}"
        )
    arrays, _ = read_safetensors(path, "the span index", fix, PrototypeIndexError)
    _check_arrays(path, arrays, fix)
    return SpanIndex(
        path=path,
        meta=meta,
        tokens=arrays["tokens"],
        suffix_array=arrays["suffix_array"],
        doc_starts=arrays["doc_starts"],
        text=arrays["text"],
        text_starts=arrays["text_starts"],
        doc_ids=_unpack_strings(arrays["ids"], arrays["id_starts"]),
        sources=_unpack_strings(arrays["sources"], arrays["source_starts"]),
    )
