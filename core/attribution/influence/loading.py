"""Opening a bundle's influence factors: the file's header checked against the bundle's weights
and index before anything is read, the store mapped read-only (:class:`.query.InfluenceFactors`),
and the per-document self-influence read alone (``prism outliers``, the explorer's Outliers page).

Every build also writes the self-influence alone, ``index/self_influence.safetensors`` (the
documents' training rows, their stored positions and their self-influence per position, with the
build's fingerprints in the header; under 1 MB at the demo's 36,998 documents): outliers need
only it, so a bundle can ship it without the store."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.attribution.influence.query import FORMAT_VERSION, INFLUENCE_FILE, InfluenceFactors, checked_corpus
from core.bundle import model_fingerprint
from core.errors import InfluenceError
from core.index.format import META_FILE, index_dir, register_index_file
from core.store import read_json, rebuild_hint
from core.tensorfile import map_tensors

SELF_INFLUENCE_FILE = "self_influence.safetensors"
SELF_INFLUENCE_FORMAT = 1
MEASURE = "self-influence per stored position"


@dataclass
class DocumentSelfInfluence:
    """A document's self-influence sum_j g_jD^T A_j g_jD per stored position (large: the
    model finds it unusual, or it holds many of its own prototypes' curvature directions)."""

    doc_index: int
    score: float
    positions: int


def _checked_header(
    bundle_dir: Path, name: str = INFLUENCE_FILE, version: int = FORMAT_VERSION
) -> tuple[Path, dict, str]:
    """(file, build metadata, rebuild hint) of an influence file (the factors, or the
    self-influence alone) in this format, built for this bundle.

    Raises:
        InfluenceError: no such file, another format, or a file built for other weights or
            another corpus than the index.
    """
    path = index_dir(bundle_dir) / name
    hint = rebuild_hint(bundle_dir)
    if not path.is_file():
        raise InfluenceError(f"{bundle_dir} has no influence factors; build them with {hint}")
    meta = _header(path, f"rebuild them with {hint}")
    if meta.get("format_version") != version:
        raise InfluenceError(
            f"{path} has format {meta.get('format_version')!r}, this version reads {version}; rebuild it with {hint}"
        )
    hint = rebuild_hint(bundle_dir, meta.get("corpus_path", "PATH"))
    current = model_fingerprint(bundle_dir)
    if meta.get("model_fingerprint") != current:
        raise InfluenceError(
            f"the influence factors in {path.parent} were built for model "
            f"{meta.get('model_fingerprint')}, not this model ({current}); rebuild them with {hint}"
        )
    index_meta_path = index_dir(bundle_dir) / META_FILE
    if index_meta_path.is_file():
        index_meta = read_json(index_meta_path, "the index metadata", f"rebuild it with {hint}", InfluenceError)
        if index_meta.get("corpus_fingerprint") != meta.get("corpus_fingerprint"):
            raise InfluenceError(
                f"the influence factors in {path.parent} were built from another corpus than the "
                f"index; rebuild both with {hint}"
            )
    return path, meta, hint


def load_influence(bundle_dir: str | Path) -> InfluenceFactors:
    """Load a bundle's influence factors after checking that they belong to its weights and index.

    Raises:
        InfluenceError: no factors, another format, or factors built for other weights or
            another corpus than the index.
    """
    bundle_dir = Path(bundle_dir)
    path, meta, hint = _checked_header(bundle_dir)
    arrays, _ = map_tensors(path, "the influence factors", f"rebuild them with {hint}", InfluenceError)
    return InfluenceFactors(bundle_dir, arrays, meta)


def self_influence(bundle_dir: str | Path, top: int | None = None) -> list[DocumentSelfInfluence]:
    """The stored documents by self-influence per position, highest first (ties: lower row);
    reads the self-influence file when the index has it, else the per-document arrays of the
    factors (not the store).

    Raises:
        InfluenceError: as :func:`load_influence`.
    """
    documents, positions, scores, _ = _self_influence_arrays(Path(bundle_dir))
    order = np.lexsort((documents, -scores))[:top]
    return [DocumentSelfInfluence(int(documents[i]), float(scores[i]), int(positions[i])) for i in order]


def outliers(bundle_dir: str | Path, top: int | None = 20) -> dict:
    """The ``top`` documents by self-influence per position (None: all) as records (rank,
    doc_id, source, doc_index, self_influence_per_token, positions, text), with the measure,
    the number of documents scored, and every document's score and source (for a histogram).

    Raises:
        InfluenceError: as :func:`load_influence`, or the training corpus moved or changed.
    """
    bundle_dir = Path(bundle_dir)
    documents, positions, scores, meta = _self_influence_arrays(bundle_dir)
    train = checked_corpus(bundle_dir, meta).train
    order = np.lexsort((documents, -scores))
    chosen = order[:top]
    rows = train[[int(documents[i]) for i in chosen]] if len(chosen) else {"id": [], "source": [], "text": []}
    records = [
        {
            "rank": place + 1,
            "doc_id": doc_id,
            "source": source,
            "doc_index": int(documents[i]),
            "self_influence_per_token": float(scores[i]),
            "positions": int(positions[i]),
            "text": text,
        }
        for place, (i, doc_id, source, text) in enumerate(
            zip(chosen, rows["id"], rows["source"], rows["text"], strict=True)
        )
    ]
    return {
        "measure": MEASURE,
        "documents": len(documents),
        "records": records,
        "all_scores": scores,
        "all_sources": np.asarray(train.select_columns(["source"])[documents.tolist()]["source"]),
    }


def save_self_influence(bundle_dir: str | Path, source: str | Path | None = None) -> Path:
    """Write ``index/self_influence.safetensors`` of a bundle from an influence file built for
    its weights: its own (the default; every build calls this) or ``source``, the influence file
    of a copy of the bundle (the demo ships only this part of it). The corpus path is recorded
    relative to this bundle.

    Raises:
        InfluenceError: the source is unreadable, in another format, or built for other weights.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import save_file

    bundle_dir = Path(bundle_dir)
    path = Path(source) if source is not None else index_dir(bundle_dir) / INFLUENCE_FILE
    meta = _header(path, f"rebuild them with {rebuild_hint(bundle_dir)}")
    if meta.get("format_version") != FORMAT_VERSION or meta.get("model_fingerprint") != model_fingerprint(bundle_dir):
        raise InfluenceError(f"{path} is not an influence file of this version built for the weights in {bundle_dir}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            documents, offsets, scores = (f.get_tensor(n) for n in ("documents", "document_offsets", "self_influence"))
    except (SafetensorError, OSError, ValueError) as err:
        raise InfluenceError(f"the influence factors {path} are not readable ({err})") from None
    corpus = checked_corpus(path.parent.parent, meta).path
    out = {
        "format_version": SELF_INFLUENCE_FORMAT,
        "kind": "prototype-block self-influence",
        "measure": MEASURE,
        **{key: meta[key] for key in ("model_fingerprint", "corpus_fingerprint", "arguments", "rank", "documents")},
        "corpus_path": str(corpus),
        "corpus_path_from_bundle": os.path.relpath(Path(corpus).resolve(), bundle_dir.resolve()),
        "build_seconds": meta.get("build_seconds"),
    }
    target = index_dir(bundle_dir) / SELF_INFLUENCE_FILE
    arrays = {
        "documents": np.ascontiguousarray(documents, dtype=np.int64),
        "positions": np.diff(offsets).astype(np.int64),
        "self_influence": np.ascontiguousarray(scores, dtype=np.float64),
    }
    partial = target.with_name(target.name + ".partial")
    save_file(arrays, str(partial), metadata={"meta": json.dumps(out)})
    partial.replace(target)
    target.chmod(0o644)  # readable as the index's other files are
    register_index_file(target.parent, SELF_INFLUENCE_FILE)
    return target


def _self_influence_arrays(bundle_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(documents, positions, self-influence per position, build metadata), from the
    self-influence file when the index has it, else from the factors."""
    from safetensors import SafetensorError, safe_open

    alone = (index_dir(bundle_dir) / SELF_INFLUENCE_FILE).is_file()
    if alone:
        path, meta, hint = _checked_header(bundle_dir, SELF_INFLUENCE_FILE, SELF_INFLUENCE_FORMAT)
        names = ("documents", "positions", "self_influence")
    else:
        path, meta, hint = _checked_header(bundle_dir)
        names = ("documents", "document_offsets", "self_influence")
    try:
        with safe_open(str(path), framework="numpy") as f:
            documents, counts, scores = (f.get_tensor(n) for n in names)
    except (SafetensorError, OSError, ValueError) as err:
        raise InfluenceError(f"{path} is not readable ({err}); rebuild it with {hint}") from None
    return documents, counts if alone else np.diff(counts), scores, meta


def _header(path: Path, fix: str) -> dict:
    """The build metadata in the factors' safetensors header, read without the arrays."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise InfluenceError(f"the influence factors {path} are not readable ({err}); {fix}") from None
