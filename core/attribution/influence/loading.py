"""Opening a bundle's influence factors: the file's header checked against the bundle's weights
and index before anything is read, the store mapped read-only (:class:`.query.InfluenceFactors`),
and the per-document self-influence read alone (``prism outliers``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.attribution.influence.query import FORMAT_VERSION, INFLUENCE_FILE, InfluenceFactors
from core.bundle import model_fingerprint
from core.errors import InfluenceError
from core.index.format import META_FILE, index_dir
from core.store import read_json, rebuild_hint
from core.tensorfile import map_tensors


@dataclass
class DocumentSelfInfluence:
    """A document's self-influence sum_j g_jD^T A_j g_jD per stored position (large: the
    model finds it unusual, or it holds many of its own prototypes' curvature directions)."""

    doc_index: int
    score: float
    positions: int


def _checked_header(bundle_dir: Path) -> tuple[Path, dict, str]:
    """(file, build metadata, rebuild hint) of factors in this format, built for this bundle.

    Raises:
        InfluenceError: no factors, another format, or factors built for other weights or
            another corpus than the index.
    """
    path = index_dir(bundle_dir) / INFLUENCE_FILE
    hint = rebuild_hint(bundle_dir)
    if not path.is_file():
        raise InfluenceError(f"{bundle_dir} has no influence factors; build them with {hint}")
    meta = _header(path, f"rebuild them with {hint}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InfluenceError(
            f"{path} has format {meta.get('format_version')!r}, this version reads "
            f"{FORMAT_VERSION}; rebuild it with {hint}"
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
    reads only the per-document arrays, not the store.

    Raises:
        InfluenceError: as :func:`load_influence`.
    """
    from safetensors import SafetensorError, safe_open

    bundle_dir = Path(bundle_dir)
    path, _, hint = _checked_header(bundle_dir)
    try:
        with safe_open(str(path), framework="numpy") as f:
            documents, offsets, scores = (f.get_tensor(n) for n in ("documents", "document_offsets", "self_influence"))
    except (SafetensorError, OSError, ValueError) as err:
        raise InfluenceError(
            f"the influence factors {path} are not readable ({err}); rebuild them with {hint}"
        ) from None
    order = np.lexsort((documents, -scores))[:top]
    counts = np.diff(offsets)
    return [DocumentSelfInfluence(int(documents[i]), float(scores[i]), int(counts[i])) for i in order]


def _header(path: Path, fix: str) -> dict:
    """The build metadata in the factors' safetensors header, read without the arrays."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise InfluenceError(f"the influence factors {path} are not readable ({err}); {fix}") from None
