"""Per-prototype tables behind the explorer's atlas and prototype cards, computed once per bundle.

Labels and the UMAP layout come from the bundle's label and atlas files when they exist
(``prism label``); otherwise prototypes carry the index's label, if any. The map opens on the
layout with the most structure among the atlas's and PCA maps of the keys and values
(``AtlasTables.layout`` says which it is, ``layout_scores`` how each scores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from core.atlas.labels import PrototypeLabel, load_labels
from core.atlas.layout import knn_purity, load_atlas_layout, shuffled_purity

if TYPE_CHECKING:  # pragma: no cover
    from core.bundle import Bundle
    from core.index.format import PrototypeIndex

NO_LABEL = ""
SNIPPET_BEFORE, SNIPPET_AFTER = 40, 20  # characters of context kept around a trigger in ``top_snippet``
SEARCH_LIMIT = 200
STRUCTURE_K = 10  # neighbours per point in the map-structure score


@dataclass
class AtlasTables:
    """Everything the map and the cards show about each of the P prototypes.

    Attributes:
        xy: (P, 2) float32 map coordinates.
        layout: how ``xy`` was computed, in words.
        usage_share, usage_count: (P,) from the index.
        labels, categories, roles, descriptions: P strings ("" when unknown).
        sources: the corpus sources, sorted; source_mix: (P, S) share of each source among
            the prototype's neighbours; dominant: P source names ("none" without neighbours).
        top_snippet: P short snippets around the nearest neighbour's trigger, for hover text.
        search_text: P lower-case strings: label, role, category, description and every
            neighbourhood snippet.
        label_records: the label records by prototype id, when the bundle has labels.
        has_labels: whether the bundle has labels (label records or index labels).
        layouts: every candidate layout by name ((P, 2) each); ``xy`` is the one that scores best.
        layout_scores: each candidate's map structure: the kNN purity (``knn_purity``, k=10) of
            ``structure_of`` ("categories" or "dominant sources") on its map.
        shuffled_score: the same purity with the groups shuffled over the points (no structure).
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
    label_records: dict[int, PrototypeLabel] = field(default_factory=dict)
    has_labels: bool = False
    layouts: dict[str, np.ndarray] = field(default_factory=dict)
    layout_scores: dict[str, float] = field(default_factory=dict)
    structure_of: str = ""
    shuffled_score: float = float("nan")

    @property
    def num_prototypes(self) -> int:
        return len(self.labels)

    def search(self, query: str, limit: int | None = SEARCH_LIMIT) -> list[int]:
        """Prototype ids whose label, role or neighbourhood text contains every word of ``query``."""
        words = query.lower().split()
        if not words:
            return []
        hits = [j for j, text in enumerate(self.search_text) if all(w in text for w in words)]
        return hits[:limit]


def pca_layout(keys: np.ndarray) -> np.ndarray:
    """(P, 2) float32: the first two principal components of the row-normalised (P, d) keys."""
    normed = keys / np.clip(np.linalg.norm(keys, axis=1, keepdims=True), 1e-8, None)  # (P, d)
    centred = (normed - normed.mean(axis=0)).astype(np.float64)
    _, vectors = np.linalg.eigh(centred.T @ centred)  # (d, d), eigenvalues ascending; cheaper than an SVD
    top = vectors[:, ::-1][:, :2]  # (d, 2)
    top = top * np.sign(top[np.abs(top).argmax(axis=0), [0, 1]])  # a fixed sign per axis: a stable picture
    return (centred @ top).astype(np.float32)  # (P, 2)


def _layout(bundle: Bundle, num_prototypes: int) -> tuple[np.ndarray, str, dict[int, PrototypeLabel]]:
    """(xy, layout in words, label records): the UMAP atlas when the bundle has one, else PCA."""
    records: dict[int, PrototypeLabel] = {}
    xy, layout = None, ""
    try:
        records = {int(r.id): r for r in (load_labels(bundle.path) or [])}
        atlas = load_atlas_layout(bundle.path)
        if atlas is not None and len(atlas[0]) == num_prototypes:
            xy, layout = atlas
    except (OSError, ValueError, KeyError) as err:  # LabelsError and AtlasError are ValueErrors
        layout = f"(labels or atlas could not be read: {err}) "
    if xy is None:
        keys = bundle.model.prototypes.keys.detach().float().cpu().numpy()  # (P, d)
        xy = pca_layout(keys)
        layout += "PCA of the normalised prototype keys (no UMAP atlas in this bundle: run `prism label --model DIR`)"
    return xy, layout, records


def candidate_layouts(bundle: Bundle, xy: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """The layouts the map may use: the bundle's own (``xy``, called ``name``) and PCA maps of what
    the prototypes read (their keys) and write (their values W), each a few milliseconds."""
    head = bundle.model.prototypes
    layouts = {name: np.asarray(xy, dtype=np.float32)}
    for what, weights in (("keys", head.keys), ("values W", head.values)):
        title = f"PCA of the normalised prototype {what}"
        if not name.startswith(title):
            layouts[title] = pca_layout(weights.detach().float().cpu().numpy())
    return layouts


def neighbourhood_sources(index: PrototypeIndex) -> tuple[list[str], np.ndarray, list[str]]:
    """(sources, (P, S) share of each source among each prototype's neighbours, P dominant sources)."""
    P = index.num_prototypes
    doc_sources = [d["source"] for d in index.documents]
    sources = sorted(set(doc_sources)) or ["unknown"]
    source_code = {s: i for i, s in enumerate(sources)}
    doc_code = np.array([source_code[s] for s in doc_sources], dtype=np.int64)  # (D,)
    rows = index.neighbour_row  # (P, M), -1 where empty
    filled = rows >= 0
    mix = np.zeros((P, len(sources)))  # (P, S)
    if doc_code.size:
        codes = np.where(filled, doc_code[index.positions["document"][np.where(filled, rows, 0)]], 0)  # (P, M)
        for s in range(len(sources)):
            mix[:, s] = ((codes == s) & filled).sum(axis=1)
    mix = mix / np.clip(mix.sum(axis=1, keepdims=True), 1, None)
    dominant = [sources[int(np.argmax(m))] if m.sum() > 0 else "none" for m in mix]
    return sources, mix, dominant


def build_atlas_tables(bundle: Bundle, index: PrototypeIndex) -> AtlasTables:
    """Collect the per-prototype tables (a few hundred ms for 1,024 prototypes x 32 neighbours).

    Reads the bundle's label and atlas files when present; never writes anything.
    """
    P = index.num_prototypes
    xy, layout, records = _layout(bundle, P)
    sources, mix, dominant = neighbourhood_sources(index)

    labels, categories, roles, descriptions = [], [], [], []
    for j in range(P):
        r = records.get(j)
        labels.append(r.text if r is not None else (index.label(j) or NO_LABEL))  # "category: role", as in core
        categories.append(str(r.category or "") if r is not None else "")
        roles.append(str(r.role or "") if r is not None else "")
        descriptions.append(str(r.description or "") if r is not None else "")
    top_snippet, search_text = [], []
    rows = index.neighbour_row  # (P, M)
    for j in range(P):
        snippets = [index.snippets[int(r)] for r in rows[j] if r >= 0]
        if snippets:
            s = snippets[0]
            around = s["snippet"][max(0, s["start"] - SNIPPET_BEFORE) : s["end"] + SNIPPET_AFTER]
            top_snippet.append(" ".join(around.split()))
        else:
            top_snippet.append("")
        search_text.append(
            " ".join([labels[j], roles[j], categories[j], descriptions[j], *(s["snippet"] for s in snippets)]).lower()
        )
    structure_of, groups = ("categories", categories) if any(categories) else ("dominant sources", dominant)
    layouts = candidate_layouts(bundle, xy, layout)
    scores = {name: knn_purity(coords, groups, STRUCTURE_K) for name, coords in layouts.items()}
    layout = max(scores, key=lambda name: (scores[name], name == layout))  # the shipped one wins ties
    return AtlasTables(
        xy=layouts[layout],
        layout=layout,
        layouts=layouts,
        layout_scores=scores,
        structure_of=structure_of,
        shuffled_score=shuffled_purity(groups),
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
