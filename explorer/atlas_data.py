"""Per-prototype tables behind the Atlas and the prototype cards, computed once per bundle.

Labels and the UMAP layout come from ``core.labels`` when that module and the bundle's label
files exist; otherwise prototypes are laid out by a PCA of their normalised keys and carry no
label (the page says which layout it shows).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from core.bundle import Bundle
from core.index.format import PrototypeIndex

NO_LABEL = ""


@dataclass
class AtlasData:
    """Everything the map and the cards show about each of the P prototypes.

    Attributes:
        xy: (P, 2) float32 map coordinates.
        layout: how ``xy`` was computed, in words.
        usage_share, usage_count: (P,) from the index.
        labels, categories, roles, descriptions: P strings ("" when unknown).
        sources: the corpus sources, sorted; source_mix: (P, S) share of each source among
            the prototype's neighbours; dominant: P source names.
        top_snippet: P short snippets (nearest neighbour), for hover text.
        search_text: P lower-case strings: label, role and all neighbourhood snippets.
        label_records: the core.labels records by id, when present.
    """

    xy: np.ndarray
    layout: str
    usage_share: np.ndarray
    usage_count: np.ndarray
    labels: list[str]
    categories: list[str]
    roles: list[str]
    descriptions: list[str]
    sources: list[str]
    source_mix: np.ndarray
    dominant: list[str]
    top_snippet: list[str]
    search_text: list[str]
    label_records: dict[int, object] = field(default_factory=dict)
    has_labels: bool = False

    @property
    def num_prototypes(self) -> int:
        return len(self.labels)

    def search(self, query: str, limit: int = 200) -> list[int]:
        """Prototype ids whose label, role or neighbourhood text contains every word of ``query``."""
        words = query.lower().split()
        if not words:
            return []
        hits = [j for j, text in enumerate(self.search_text) if all(w in text for w in words)]
        return hits[:limit]


def optional_module(name: str):
    """A core module built by another part of the project, or None while it does not exist."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def pca_layout(keys: np.ndarray) -> np.ndarray:
    """(P, 2) float32: the first two principal components of the row-normalised keys."""
    normed = keys / np.clip(np.linalg.norm(keys, axis=1, keepdims=True), 1e-8, None)  # (P, d)
    centred = (normed - normed.mean(axis=0)).astype(np.float64)
    _, vectors = np.linalg.eigh(centred.T @ centred)  # (d, d), eigenvalues ascending; cheaper than an SVD
    top = vectors[:, ::-1][:, :2]  # (d, 2)
    top = top * np.sign(top[np.abs(top).argmax(axis=0), [0, 1]])  # a fixed sign per axis: a stable picture
    return (centred @ top).astype(np.float32)  # (P, 2)


def build_atlas_data(bundle: Bundle, index: PrototypeIndex) -> AtlasData:
    """Collect the per-prototype tables (a few hundred ms for 1,024 prototypes x 32 neighbours)."""
    P = index.num_prototypes
    keys = bundle.model.prototypes.keys.detach().float().cpu().numpy()  # (P, d)
    records: dict[int, object] = {}
    xy, layout = None, ""
    labels_mod, atlas_mod = optional_module("core.atlas.labels"), optional_module("core.atlas.layout")
    try:
        if labels_mod is not None and hasattr(labels_mod, "load_labels"):
            records = {int(r.id): r for r in (labels_mod.load_labels(bundle.path) or [])}
        loader = getattr(labels_mod, "load_atlas", None) or getattr(atlas_mod, "load_atlas", None)
        atlas = loader(bundle.path) if loader is not None else None
        if atlas is not None and len(atlas) == P:
            xy, layout = np.asarray(atlas, dtype=np.float32), "UMAP of the normalised prototype keys"
    except (OSError, ValueError, KeyError, AttributeError) as err:
        layout = f"(labels or atlas could not be read: {err}) "
    if xy is None:
        xy = pca_layout(keys)
        layout += "PCA of the normalised prototype keys (no UMAP atlas in this bundle: run `prism label --model DIR`)"

    doc_sources = [d["source"] for d in index.documents]
    sources = sorted(set(doc_sources)) or ["unknown"]
    source_code = {s: i for i, s in enumerate(sources)}
    doc_code = np.array([source_code[s] for s in doc_sources], dtype=np.int64)
    rows = index.neighbour_row  # (P, M)
    filled = rows >= 0
    mix = np.zeros((P, len(sources)))
    if doc_code.size:
        codes = np.where(filled, doc_code[index.positions["document"][np.where(filled, rows, 0)]], 0)  # (P, M)
        for s in range(len(sources)):
            mix[:, s] = ((codes == s) & filled).sum(axis=1)
    mix = mix / np.clip(mix.sum(axis=1, keepdims=True), 1, None)
    dominant = [sources[int(np.argmax(m))] if m.sum() > 0 else "none" for m in mix]

    labels, categories, roles, descriptions = [], [], [], []
    for j in range(P):
        r = records.get(j)
        labels.append(str(getattr(r, "role", "") or "") if r is not None else (index.label(j) or NO_LABEL))
        categories.append(str(getattr(r, "category", "") or ""))
        roles.append(str(getattr(r, "role", "") or ""))
        descriptions.append(str(getattr(r, "description", "") or ""))
    top_snippet, search_text = [], []
    for j in range(P):
        snippets = [index.snippets[int(r)] for r in rows[j] if r >= 0]
        if snippets:
            s = snippets[0]
            around = s["snippet"][max(0, s["start"] - 40) : s["end"] + 20]
            top_snippet.append(" ".join(around.split()))
        else:
            top_snippet.append("")
        search_text.append(" ".join([labels[j], roles[j], categories[j], descriptions[j],
                                     *(s["snippet"] for s in snippets)]).lower())
    return AtlasData(
        xy=xy,
        layout=layout,
        usage_share=np.asarray(index.usage_share, dtype=np.float64),
        usage_count=np.asarray(index.usage_count),
        labels=labels,
        categories=categories,
        roles=roles,
        descriptions=descriptions,
        sources=sources,
        source_mix=mix,
        dominant=dominant,
        top_snippet=top_snippet,
        search_text=search_text,
        label_records=records,
        has_labels=bool(records) or bool(index.labels),
    )
