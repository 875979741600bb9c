"""The prototype index as stored: every prototype's neighbourhood of training positions, its
usage and the tokens it promotes (built by :mod:`core.index.build`).

A training *position* t of a packed sequence is the context up to and including token t,
which the model trained to predict token t + 1; its hidden state is h_t. Neighbourhood of
prototype j: the top-M positions by cos(K_j, h_t) among the positions where j was active, at
most one per document; spare places hold inactive positions, with ``active = 0`` and
``weight = 0`` (see :mod:`core.index.build` for why).

Layout of ``BUNDLE/index/`` (safetensors and JSON only; nothing is ever unpickled)::

    meta.json                   format version, build arguments, model and corpus
                                fingerprints, counts, build time, file sizes
    neighbourhoods.safetensors  per prototype (P rows, M slots):
        neighbour_row (P, M) int32    row of the positions table, -1 for an empty slot
        cosine (P, M)                 cos(K_j, h_t) of each neighbour
        weight (P, M)                 a_j at that position, 0 where j was not active
        active (P, M) uint8           1 where j was one of the k active prototypes
        usage_count (P,) int64        positions where j was active
        usage_share (P,) float64      usage_count / (positions * k): sums to 1 over prototypes
        promoted_token_ids (P, L) int32, promoted_logits (P, L) float32: top tokens of E W_j
    positions.safetensors       per neighbour position (R rows): document (row of
                                documents.jsonl), doc_index (row of the training split),
                                char_offset, token_id, next_token_id, sequence, offset, and
                                its prototype code: code_ids (R, k) int32, its k active
                                prototypes, and code_cosine (R, k), their cos(K_j, h_t)
    positions.jsonl             per neighbour position: {"snippet", "start", "end"}, the text
                                around it with [start, end) the trigger token inside it
    documents.jsonl             per referenced document: {"doc_index", "id", "source", "chars"}

Later artifacts (labels, the atlas, influence factors) are added as further files listed in
``meta.json["files"]`` through :func:`register_index_file`, the one writer of ``meta.json``
after the build; a reader ignores files it does not know.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.bundle import model_fingerprint
from core.errors import LabelsError, PrototypeIndexError
from core.store import parse_json, read_json, read_safetensors, rebuild_hint, write_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_DIR = "index"
META_FILE = "meta.json"
SNIPPET_BEFORE = 120  # characters of context kept before a neighbour's trigger token
SNIPPET_AFTER = 60  # and after it
PROMOTED_TOKENS = 10  # top tokens of E W_j stored per prototype
REQUIRED_FILES = (
    "meta.json",
    "neighbourhoods.safetensors",
    "positions.safetensors",
    "positions.jsonl",
    "documents.jsonl",
)


def index_dir(bundle_dir: str | Path) -> Path:
    """Where a bundle's index lives."""
    return Path(bundle_dir) / INDEX_DIR


def check_training_corpus(bundle_dir: str | Path, training: object, fingerprint: object, subject: str) -> None:
    """Refuse a corpus, or an index built from one, that is not the model's training corpus.

    A model's neighbourhoods, spans and influence are statements about the documents it was
    trained on; built from other documents they would credit text the model never saw. A
    bundle whose training.json records no corpus (weights trained elsewhere) is not checked.

    Args:
        bundle_dir: the bundle, for the message.
        training: the bundle's training.json contents.
        fingerprint: the corpus fingerprint to check.
        subject: what was built from it, for the message ("corpus data/x.jsonl",
            "the index in b/index, built from data/x.jsonl,").

    Raises:
        PrototypeIndexError: the fingerprints differ.
    """
    trained = training.get("corpus_fingerprint") if isinstance(training, dict) else None
    if trained is None or fingerprint == trained:
        return
    raise PrototypeIndexError(
        f"{subject} is not the corpus the model in {bundle_dir} was trained on (corpus fingerprint "
        f"{str(fingerprint)[:16]}, trained on {str(trained)[:16]}); index the training corpus with "
        f"{rebuild_hint(bundle_dir)}"
    )


def index_exists(bundle_dir: str | Path) -> bool:
    """True when the bundle holds a complete index (it may still be stale)."""
    folder = index_dir(bundle_dir)
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def snippet_window(text: str, begin: int, end: int) -> tuple[str, int, int]:
    """The text around a token at ``text[begin:end]`` (begin <= end): SNIPPET_BEFORE characters
    before it and SNIPPET_AFTER after it, and the token's span inside that snippet.

    Returns:
        (snippet, start, end) with ``snippet[start:end] == text[begin:end]``.
    """
    lo, hi = max(0, begin - SNIPPET_BEFORE), min(len(text), end + SNIPPET_AFTER)
    return text[lo:hi], begin - lo, end - lo


def register_index_file(folder: str | Path, name: str, **sections: object) -> None:
    """List a file added to the index in ``meta.json["files"]`` (name -> bytes).

    The one place that updates an index's ``meta.json`` after the build (labels, the atlas
    and the influence factors call it); the rewrite is atomic.

    Args:
        folder: the index folder (:func:`index_dir`).
        name: the file inside it, already written.
        sections: top-level entries to set as well (``influence={...}``: a summary of the file).
    """
    folder = Path(folder)
    meta_path = folder / META_FILE
    meta = read_json(meta_path, "the index metadata", error=PrototypeIndexError)
    meta.setdefault("files", {})[name] = (folder / name).stat().st_size
    meta.update(sections)
    write_json(meta_path, meta, indent=2)


@dataclass
class PrototypeIndex:
    """A loaded index (see the module docstring for the meaning of each array).

    Read-only once loaded: the explorer's sessions share one. What the layers above derive
    from it (the attribution engine's neighbour codes, the influence factors) they cache
    themselves, keyed by the index object.

    Attributes:
        path: the index folder.
        meta: the contents of meta.json.
        neighbour_row: (P, M) rows of the positions table, -1 for empty slots.
        cosine, weight: (P, M) cos(K_j, h_t) and a_j of each neighbour.
        active: (P, M) bool, j active at that neighbour.
        usage_count: (P,) positions where j was active; usage_share: (P,) its share.
        promoted_token_ids, promoted_logits: (P, L) top tokens of E W_j.
        positions: per-position arrays (R,): document, doc_index, char_offset, token_id,
            next_token_id, sequence, offset.
        snippets: R dicts {"snippet", "start", "end"}.
        documents: dicts {"doc_index", "id", "source", "chars"}, one per referenced document.
        labels: prototype id -> label, empty until labels are computed.
    """

    path: Path
    meta: dict
    neighbour_row: np.ndarray
    cosine: np.ndarray
    weight: np.ndarray
    active: np.ndarray
    usage_count: np.ndarray
    usage_share: np.ndarray
    promoted_token_ids: np.ndarray
    promoted_logits: np.ndarray
    positions: dict[str, np.ndarray]
    snippets: list[dict]
    documents: list[dict]
    labels: dict[int, str] = field(default_factory=dict)
    _shares: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # (P, M) float64, computed once here so that the loaded index is never written to.
        similarity = np.where(self.neighbour_row >= 0, np.clip(self.cosine.astype(np.float64), 0, None), 0.0)
        totals = similarity.sum(axis=1, keepdims=True)  # (P, 1)
        self._shares = np.divide(similarity, totals, out=np.zeros_like(similarity), where=totals > 0)

    @property
    def model_fingerprint(self) -> str:
        return self.meta["model_fingerprint"]

    @property
    def corpus_fingerprint(self) -> str:
        return self.meta["corpus_fingerprint"]

    @property
    def num_prototypes(self) -> int:
        return self.neighbour_row.shape[0]

    @property
    def top_m(self) -> int:
        return self.neighbour_row.shape[1]

    def shares(self) -> np.ndarray:
        """(P, M) float64 share of each neighbour in its prototype's credit.

        The non-negative part of the cosine, normalised to sum to 1 over the prototype's
        neighbourhood; a prototype without any positive cosine shares nothing (all zeros).
        """
        return self._shares

    def label(self, prototype: int) -> str | None:
        """The prototype's label, or None until labels exist."""
        return self.labels.get(int(prototype))

    def example(self, row: int) -> dict:
        """A neighbour position as a record: document, snippet and the trigger's span in it."""
        document = self.documents[int(self.positions["document"][row])]
        snippet = self.snippets[row]
        return {
            "doc_id": document["id"],
            "source": document["source"],
            "doc_index": document["doc_index"],
            "char_offset": int(self.positions["char_offset"][row]),
            "token_id": int(self.positions["token_id"][row]),
            "next_token_id": int(self.positions["next_token_id"][row]),
            "snippet": snippet["snippet"],
            "highlight_start": snippet["start"],
            "highlight_end": snippet["end"],
        }

    def neighbourhood(self, prototype: int) -> list[dict]:
        """The neighbours of one prototype, nearest first, with cosine, weight and share."""
        if not 0 <= prototype < self.num_prototypes:
            raise ValueError(f"unknown prototype id {prototype} (the index has 0..{self.num_prototypes - 1})")
        shares = self.shares()[prototype]
        records = []
        for slot, row in enumerate(self.neighbour_row[prototype]):
            if row < 0:
                continue
            records.append(
                {
                    **self.example(int(row)),
                    "cosine": float(self.cosine[prototype, slot]),
                    "weight": float(self.weight[prototype, slot]),
                    "active": bool(self.active[prototype, slot]),
                    "share": float(shares[slot]),
                }
            )
        return records


NEIGHBOURHOOD_ARRAYS = (
    "neighbour_row",
    "cosine",
    "weight",
    "active",
    "usage_count",
    "usage_share",
    "promoted_token_ids",
    "promoted_logits",
)
POSITION_ARRAYS = ("document", "doc_index", "char_offset", "token_id", "next_token_id", "sequence", "offset")
SNIPPET_KEYS = {"snippet": str, "start": int, "end": int}
DOCUMENT_KEYS = {"doc_index": int, "id": str, "source": str, "chars": int}


def _read_jsonl(path: Path, fix: str, keys: dict[str, type]) -> list[dict]:
    """The rows of one of the index's JSONL files, each an object with ``keys`` of those types."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PrototypeIndexError(f"{path} cannot be read ({err}); {fix}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = parse_json(line, f"{path} line {number}", fix, PrototypeIndexError)
        bad = (
            [key for key, kind in keys.items() if isinstance(row.get(key), bool) or not isinstance(row.get(key), kind)]
            if isinstance(row, dict)
            else ["(not an object)"]
        )
        if bad:
            raise PrototypeIndexError(f"{path} line {number} lacks {', '.join(bad)}; {fix}")
        rows.append(row)
    return rows


def _check_arrays(folder: Path, arrays: dict, positions: dict, snippets: list, documents: list, fix: str) -> None:
    """Refuse index files that do not fit together (a file cut short, or one from another build)."""
    for name, table, required in (
        ("neighbourhoods.safetensors", arrays, NEIGHBOURHOOD_ARRAYS),
        ("positions.safetensors", positions, POSITION_ARRAYS),
    ):
        missing = [key for key in required if key not in table]
        if missing:
            raise PrototypeIndexError(f"{folder / name} lacks {', '.join(missing)}; {fix}")
    P, M = arrays["neighbour_row"].shape if arrays["neighbour_row"].ndim == 2 else (-1, -1)
    for key in NEIGHBOURHOOD_ARRAYS:
        if arrays[key].shape[:1] != (P,) or (key in ("cosine", "weight", "active") and arrays[key].shape != (P, M)):
            raise PrototypeIndexError(
                f"{folder / 'neighbourhoods.safetensors'}: {key} has shape {arrays[key].shape}, not ({P}, ...); {fix}"
            )
    R = len(positions["document"])
    for key, values in positions.items():
        if len(values) != R:
            raise PrototypeIndexError(
                f"{folder / 'positions.safetensors'}: {key} has {len(values)} rows, not {R}; {fix}"
            )
    rows = arrays["neighbour_row"]
    if rows.size and (rows.min() < -1 or rows.max() >= R):
        raise PrototypeIndexError(f"{folder / 'neighbourhoods.safetensors'} points past the {R} positions; {fix}")
    if len(snippets) != R:
        raise PrototypeIndexError(f"{folder / 'positions.jsonl'} has {len(snippets)} rows, the positions {R}; {fix}")
    if R and (positions["document"].min() < 0 or positions["document"].max() >= len(documents)):
        raise PrototypeIndexError(
            f"{folder / 'documents.jsonl'} has {len(documents)} rows, fewer than the positions refer to; {fix}"
        )


def load_index(bundle_dir: str | Path, corpus_fingerprint: str | None = None) -> PrototypeIndex:
    """Load a bundle's index after checking that it belongs to this model (and corpus).

    Args:
        bundle_dir: the bundle folder.
        corpus_fingerprint: if given, the index must have been built from this corpus.

    Raises:
        PrototypeIndexError: no index, an incomplete, unreadable or unknown-format one, files
            that do not fit together, or one built for other weights or another corpus.
    """
    folder = index_dir(bundle_dir)
    if not (folder / META_FILE).is_file():
        raise PrototypeIndexError(f"{bundle_dir} has no index; build it with {rebuild_hint(bundle_dir)}")
    meta = read_json(
        folder / META_FILE, "the index metadata", f"rebuild it with {rebuild_hint(bundle_dir)}", PrototypeIndexError
    )
    if not isinstance(meta, dict):
        raise PrototypeIndexError(
            f"the index metadata {folder / META_FILE} is not a JSON object; rebuild it with {rebuild_hint(bundle_dir)}"
        )
    fix = f"rebuild it with {rebuild_hint(bundle_dir, meta.get('corpus_path', 'PATH'))}"
    if meta.get("format_version") != FORMAT_VERSION:
        raise PrototypeIndexError(
            f"the index in {folder} has format {meta.get('format_version')!r}, this version reads {FORMAT_VERSION}; "
            f"{fix}"
        )
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise PrototypeIndexError(f"the index in {folder} is incomplete (missing {', '.join(missing)}); {fix}")
    current = model_fingerprint(bundle_dir)
    if meta.get("model_fingerprint") != current:
        raise PrototypeIndexError(
            f"the index in {folder} was built for model {meta.get('model_fingerprint')}, not this model ({current}); "
            f"{fix}"
        )
    training_file = Path(bundle_dir) / "training.json"
    if training_file.is_file():
        training = read_json(training_file, "the training record", fix, PrototypeIndexError)
        subject = f"the index in {folder}, built from {meta.get('corpus_path')},"
        check_training_corpus(bundle_dir, training, meta.get("corpus_fingerprint"), subject)
    if corpus_fingerprint is not None and meta.get("corpus_fingerprint") != corpus_fingerprint:
        raise PrototypeIndexError(
            f"the index in {folder} was built from corpus {str(meta.get('corpus_fingerprint'))[:16]} "
            f"({meta.get('corpus_path')}), not this corpus ({corpus_fingerprint[:16]}); rebuild it with "
            f"{rebuild_hint(bundle_dir)}"
        )
    arrays, _ = read_safetensors(
        folder / "neighbourhoods.safetensors", "the index's neighbourhoods", fix, PrototypeIndexError
    )
    positions, _ = read_safetensors(folder / "positions.safetensors", "the index's positions", fix, PrototypeIndexError)
    snippets = _read_jsonl(folder / "positions.jsonl", fix, SNIPPET_KEYS)
    documents = _read_jsonl(folder / "documents.jsonl", fix, DOCUMENT_KEYS)
    _check_arrays(folder, arrays, positions, snippets, documents, fix)
    return PrototypeIndex(
        path=folder,
        meta=meta,
        neighbour_row=arrays["neighbour_row"],
        cosine=arrays["cosine"],
        weight=arrays["weight"],
        active=arrays["active"].astype(bool),
        usage_count=arrays["usage_count"],
        usage_share=arrays["usage_share"],
        promoted_token_ids=arrays["promoted_token_ids"],
        promoted_logits=arrays["promoted_logits"],
        positions=positions,
        snippets=snippets,
        documents=documents,
        labels=_read_labels(folder, current, bundle_dir),
    )


def _read_labels(folder: Path, fingerprint: str, bundle_dir: str | Path) -> dict[int, str]:
    """ "category: role" per prototype from labels.json (written by core.atlas.labels); none when
    it is missing or made for other weights (with a warning).

    Raises:
        LabelsError: the file is unreadable or its entries lack id, category or role.
    """
    path = folder / "labels.json"
    if not path.is_file():
        return {}
    fix = f"rebuild it with `prism label --model {bundle_dir}`"
    raw = read_json(path, "the labels file", fix, error=LabelsError)
    if not isinstance(raw, dict):
        raise LabelsError(f"the labels file {path} is not a JSON object; {fix}")
    if raw.get("model_fingerprint") != fingerprint:
        logger.warning("ignoring %s: made for other weights; run `prism label`", path)
        return {}
    entries = raw.get("labels", [])
    labels = {}
    for number, entry in enumerate(entries if isinstance(entries, list) else [None]):
        try:
            labels[int(entry["id"])] = f"{entry['category']}: {entry['role']}"
        except (TypeError, KeyError, ValueError):
            raise LabelsError(f"the labels file {path}: entry {number} lacks id, category or role; {fix}") from None
    return labels
