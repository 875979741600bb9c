"""Prototype geometry: the atlas (a 2-D UMAP map of the prototypes, cached in
``BUNDLE/index/atlas.json``) and the hidden states of their neighbourhoods (coherence).

The map's input is one vector per prototype describing it (``LAYOUT_INPUTS``): what it reads
(its keys), what it writes (its values W), the tokens it promotes, the tokens it fires on, or
the prototypes it fires with (co-activation, from the index). UMAP runs on them under the cosine
metric. :func:`compare_layouts` scores every input by the map's structure (``knn_purity`` of
the label categories and of the dominant sources); the default input is the one that scored
best on the demo bundle (co-activation: 0.73 against 0.31 for the keys, 0.22 shuffled; see
docs/explorer.md), so that neighbourhoods on the map are prototypes that work together.

The file stores the coordinates with the arguments that produced them and the model
fingerprint; :func:`build_atlas` reuses it when both match and recomputes it otherwise. UMAP
runs seeded (single-threaded, hence deterministic) and offline.

The index keeps no hidden states; :func:`neighbour_hidden_states` re-reads every neighbour
position's snippet in one batched forward pass, for coherence and context fidelity.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from core import store
from core.bundle import Bundle, load_bundle, model_fingerprint
from core.errors import AtlasError, PrototypeIndexError
from core.index.format import PrototypeIndex, index_dir, load_index, register_index_file
from core.model.head import active_prototypes, prototype_scores

logger = logging.getLogger(__name__)

ATLAS_FILE = "atlas.json"
ATLAS_FORMAT = 1
METRIC = "cosine"
CONTEXT_TOKENS = 64  # at most this many tokens re-read before each neighbour's trigger
FORWARD_BATCH = 128


def _coactivation(bundle: Bundle, index: PrototypeIndex) -> np.ndarray:
    """(P, P): for each prototype, how often each other prototype is active at its neighbourhood's positions."""
    P = index.num_prototypes
    rows = index.neighbour_row  # (P, M), -1 where empty
    codes = index.positions["code_ids"][np.where(rows >= 0, rows, 0)]  # (P, M, k) active prototypes there
    owner = np.broadcast_to(np.arange(P)[:, None, None], codes.shape)  # (P, M, k)
    keep = np.broadcast_to((rows >= 0)[:, :, None], codes.shape) & (codes != owner)  # itself excluded
    counts = np.zeros((P, P))
    np.add.at(counts, (owner[keep], codes[keep]), 1.0)
    return counts


def _trigger_tokens(bundle: Bundle, index: PrototypeIndex) -> np.ndarray:
    """(P, V): how often each token is the trigger at the prototype's neighbourhood positions."""
    rows = index.neighbour_row  # (P, M)
    tokens = index.positions["token_id"][np.where(rows >= 0, rows, 0)]  # (P, M)
    counts = np.zeros((index.num_prototypes, bundle.model.config.get_text_config().vocab_size))
    owner = np.broadcast_to(np.arange(index.num_prototypes)[:, None], rows.shape)
    np.add.at(counts, (owner[rows >= 0], tokens[rows >= 0]), 1.0)
    return counts


def _promoted_tokens(bundle: Bundle, index: PrototypeIndex) -> np.ndarray:
    """(P, V): softmax over the vocabulary of W_j E^T, the tokens each prototype's value promotes."""
    values = bundle.model.prototypes.values.detach().double().cpu()  # (P, d)
    embedding = bundle.model.unembedding.detach().double().cpu()  # (V, d)
    return torch.softmax(values @ embedding.T, dim=-1).numpy()  # (P, V)


# name -> (what the map then shows, in words; (bundle, index) -> (P, F) vectors, any scale: UMAP
# compares them by cosine). The first entry is the default: the best by the structure measure.
LAYOUT_INPUTS = {
    "co-activation": ("co-activation (which prototypes fire together)", _coactivation),
    "keys": ("the keys (what prototypes read)", lambda bundle, index: _prototype_keys(bundle)),
    "values": ("the values W (what prototypes write)", lambda bundle, index: _prototype_values(bundle)),
    "promoted tokens": ("promoted tokens (softmax of W E^T)", _promoted_tokens),
    "trigger tokens": ("trigger tokens (what prototypes fire on)", _trigger_tokens),
}
DEFAULT_INPUT = next(iter(LAYOUT_INPUTS))


def _arguments(n_neighbors: int, min_dist: float, seed: int, layout_input: str) -> dict:
    return {
        "n_neighbors": n_neighbors,
        "min_dist": min_dist,
        "seed": seed,
        "metric": METRIC,
        "input": layout_input,
    }


def layout_name(arguments: dict) -> str:
    """How the app names a map made with ``arguments`` (an atlas record's), in words."""
    what = LAYOUT_INPUTS.get(arguments.get("input"), (str(arguments.get("input")), None))[0]
    return f"UMAP of {what}, n_neighbors {arguments.get('n_neighbors')}"


def _prism_bundle(bundle_dir: Path) -> Bundle:
    bundle = load_bundle(bundle_dir)
    if not bundle.is_prism:
        raise AtlasError(f"{bundle_dir} is a dense twin: only PRISM models have prototypes to map")
    return bundle


def _prototype_keys(bundle: Bundle) -> np.ndarray:
    """(P, d) float64 prototype keys."""
    return bundle.model.prototypes.keys.detach().double().cpu().numpy()


def _prototype_values(bundle: Bundle) -> np.ndarray:
    """(P, d) float64 prototype values W."""
    return bundle.model.prototypes.values.detach().double().cpu().numpy()


def umap_coordinates(vectors: np.ndarray, n_neighbors: int, min_dist: float, seed: int) -> np.ndarray:
    """(P, 2) float32 UMAP coordinates of the normalised (P, F) vectors (cosine metric)."""
    import umap  # imported here: numba compiles on first use, and core does no work at import

    unit = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)  # (P, F)
    reducer = umap.UMAP(
        n_neighbors=n_neighbors, min_dist=min_dist, metric=METRIC, random_state=seed, n_jobs=1, n_components=2
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        coords = reducer.fit_transform(unit.astype(np.float32))  # (P, 2)
    return np.asarray(coords, dtype=np.float32)


def _read_atlas(path: Path) -> dict | None:
    """The cached atlas record, or None when it is missing or unreadable (it is then recomputed)."""
    try:
        record = store.read_json(path, "the atlas", error=AtlasError)
    except AtlasError:
        return None
    return record if isinstance(record, dict) else None


def _valid(record: dict | None, arguments: dict | None, fingerprint: str, num_prototypes: int | None) -> bool:
    if not record or record.get("format_version") != ATLAS_FORMAT or record.get("model_fingerprint") != fingerprint:
        return False
    if arguments is not None and record.get("arguments") != arguments:
        return False
    coords = record.get("coordinates")
    return isinstance(coords, list) and (num_prototypes is None or len(coords) == num_prototypes)


def _check_umap_arguments(n_neighbors: int, min_dist: float, seed: int, layout_input: str) -> None:
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 2:
        raise AtlasError(f"n_neighbors must be an integer >= 2, got {n_neighbors!r}")
    if not 0.0 <= float(min_dist) <= 1.0:
        raise AtlasError(f"min_dist must lie in [0, 1], got {min_dist!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise AtlasError(f"seed must be a non-negative integer, got {seed!r}")
    if layout_input not in LAYOUT_INPUTS:
        raise AtlasError(f"layout_input must be one of {', '.join(LAYOUT_INPUTS)}, got {layout_input!r}")


def _indexed(bundle_dir: Path) -> Path:
    """The bundle's index folder; PrototypeIndexError when it has no index."""
    folder = index_dir(bundle_dir)
    if not (folder / "meta.json").is_file():
        raise PrototypeIndexError(f"{bundle_dir} has no index; build it with {store.rebuild_hint(bundle_dir)}")
    return folder


def build_atlas(
    bundle_dir: str | Path,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 0,
    layout_input: str = DEFAULT_INPUT,
) -> np.ndarray:
    """UMAP coordinates of every prototype, from the cache when its arguments and model match.

    Args:
        bundle_dir: an indexed PRISM bundle.
        n_neighbors: UMAP's neighbourhood size (2 .. P - 1).
        min_dist: UMAP's minimum distance between points on the map (0 .. 1).
        seed: UMAP's random state.
        layout_input: what each prototype is described by, a key of ``LAYOUT_INPUTS``.

    Returns:
        (P, 2) float32 coordinates, row j for prototype j.

    Raises:
        AtlasError: bad arguments or a dense bundle.
        PrototypeIndexError: the bundle has no index folder to keep the atlas in.
    """
    _check_umap_arguments(n_neighbors, min_dist, seed, layout_input)
    bundle_dir = Path(bundle_dir)
    folder = _indexed(bundle_dir)
    fingerprint = model_fingerprint(bundle_dir)
    arguments = _arguments(n_neighbors, float(min_dist), seed, layout_input)
    path = folder / ATLAS_FILE
    record = _read_atlas(path)
    if _valid(record, arguments, fingerprint, None):
        logger.info("atlas: reusing %s", path)
        return np.asarray(record["coordinates"], dtype=np.float32)
    vectors = LAYOUT_INPUTS[layout_input][1](_prism_bundle(bundle_dir), load_index(bundle_dir))  # (P, F)
    if n_neighbors >= len(vectors):
        raise AtlasError(f"n_neighbors must be below the number of prototypes ({len(vectors)}), got {n_neighbors}")
    coords = umap_coordinates(vectors, n_neighbors, float(min_dist), seed)
    payload = {
        "format_version": ATLAS_FORMAT,
        "model_fingerprint": fingerprint,
        "arguments": arguments,
        "coordinates": [[round(float(x), 5), round(float(y), 5)] for x, y in coords],
    }
    store.write_json(path, payload)
    register_index_file(folder, ATLAS_FILE)
    return np.asarray(payload["coordinates"], dtype=np.float32)


def load_atlas_layout(bundle_dir: str | Path) -> tuple[np.ndarray, str] | None:
    """The cached (P, 2) coordinates and the layout's name in words (:func:`layout_name`), or None
    when absent or made for other weights."""
    bundle_dir = Path(bundle_dir)
    record = _read_atlas(index_dir(bundle_dir) / ATLAS_FILE)
    if record is None:
        return None
    if not _valid(record, None, model_fingerprint(bundle_dir), None):
        logger.warning("atlas in %s belongs to other weights; run `prism label --model %s`", bundle_dir, bundle_dir)
        return None
    return np.asarray(record["coordinates"], dtype=np.float32), layout_name(record.get("arguments") or {})


def load_atlas(bundle_dir: str | Path) -> np.ndarray | None:
    """The cached (P, 2) coordinates, or None when absent or made for other weights."""
    found = load_atlas_layout(bundle_dir)
    return None if found is None else found[0]


def compare_layouts(
    bundle: Bundle,
    index: PrototypeIndex,
    groups: dict[str, list[str]],
    *,
    n_neighbors: tuple[int, ...] = (15, 30),
    min_dist: float = 0.1,
    seed: int = 0,
) -> list[dict]:
    """Every candidate map (each of ``LAYOUT_INPUTS`` under each ``n_neighbors``) with its
    structure: the kNN purity (k=10) of each grouping in ``groups`` on it.

    Args:
        bundle: a loaded PRISM bundle; index: its prototype index.
        groups: name -> P group names (e.g. "categories" -> the label categories).
        n_neighbors: the UMAP neighbourhood sizes tried.
        min_dist: UMAP's minimum distance between points on the map.
        seed: UMAP's random state.

    Returns:
        One row per map: {"input", "n_neighbors", "layout" (its name in words), and one purity
        per grouping}, in the order computed (several seconds per map on a CPU).
    """
    rows = []
    for layout_input, (_, describe) in LAYOUT_INPUTS.items():
        vectors = describe(bundle, index)  # (P, F)
        for n in n_neighbors:
            arguments = _arguments(n, min_dist, seed, layout_input)
            xy = umap_coordinates(vectors, n, min_dist, seed)
            purity = {name: round(knn_purity(xy, g), 4) for name, g in groups.items()}
            rows.append({"input": layout_input, "n_neighbors": n, "layout": layout_name(arguments), **purity})
    return rows


@torch.no_grad()
def neighbour_hidden_states(bundle, index: PrototypeIndex, progress: bool = False) -> tuple[np.ndarray, float]:
    """Re-read every neighbour position: its (R, d) hidden state and the token match rate.

    Each context is the position's snippet up to the end of its trigger token, cut to the
    tokens the original context had (its offset in the packed sequence + 1) and to
    CONTEXT_TOKENS, with an EOS in front when the snippet begins at its document's start.
    The match rate is the share of contexts whose last token is the indexed trigger token.
    """
    from tqdm.auto import tqdm

    tokenizer, model = bundle.tokenizer, bundle.model
    eos = tokenizer.eos_token_id
    texts = [snip["snippet"][: snip["end"]] for snip in index.snippets]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    contexts = []
    for r, ids in enumerate(encoded):
        snip = index.snippets[r]
        at_doc_start = int(index.positions["char_offset"][r]) == snip["start"]
        ids = ([eos] if at_doc_start and eos is not None else []) + list(ids)
        keep = min(CONTEXT_TOKENS, int(index.positions["offset"][r]) + 1)
        contexts.append(ids[-keep:] or [eos])
    matched = np.mean([c[-1] == int(t) for c, t in zip(contexts, index.positions["token_id"], strict=True)])
    order = sorted(range(len(contexts)), key=lambda r: (len(contexts[r]), r))
    d = model.config.get_text_config().hidden_size
    hidden = np.zeros((len(contexts), d), dtype=np.float32)
    batches = range(0, len(order), FORWARD_BATCH)
    for first in tqdm(batches, desc="labelling: re-reading neighbours", unit="batch", disable=not progress):
        part = order[first : first + FORWARD_BATCH]
        width = max(len(contexts[r]) for r in part)
        ids = torch.full((len(part), width), eos if eos is not None else 0, dtype=torch.long)  # (B, T)
        for i, r in enumerate(part):
            ids[i, : len(contexts[r])] = torch.tensor(contexts[r])
        # Right padding is harmless: attention is causal, so a state never sees later pads.
        states = model.model(input_ids=ids.to(model.device)).last_hidden_state  # (B, T, d)
        last = torch.tensor([len(contexts[r]) - 1 for r in part], device=states.device)
        hidden[part] = states[torch.arange(len(part)), last].float().cpu().numpy()
    return hidden, float(matched) if len(contexts) else 0.0


def coherence(unit: np.ndarray, rows: list[np.ndarray]) -> np.ndarray:
    """(P,) mean pairwise cosine of each neighbourhood's (unit-norm) hidden states."""
    result = np.zeros(len(rows))
    for j, r in enumerate(rows):
        n = len(r)
        if n >= 2:
            total = unit[r].sum(axis=0)  # (d,)
            result[j] = (float(total @ total) - n) / (n * (n - 1))  # off-diagonal mean of the Gram matrix
    return result


def context_fidelity(hidden: np.ndarray, keys: np.ndarray, top_k: int, rows: list[np.ndarray]) -> np.ndarray:
    """(P,) share of each prototype's neighbours where it is active in the re-read context."""
    scores = prototype_scores(torch.from_numpy(hidden).double(), torch.from_numpy(keys).double())  # (R, P)
    active = active_prototypes(scores, top_k)[0].numpy()  # (R, k)
    return np.array([float(np.mean((active[r] == j).any(axis=1))) if len(r) else 0.0 for j, r in enumerate(rows)])


def knn_purity(xy: np.ndarray, groups: list[str] | np.ndarray, k: int = 10, chunk: int = 1024) -> float:
    """Map structure: the mean share of each point's ``k`` nearest neighbours on the 2-D map
    that belong to its own group (category, dominant source), in [0, 1].

    Args:
        xy: (N, 2) map coordinates.
        groups: N group names.
        k: neighbours per point (capped at N - 1).
        chunk: rows of the (chunk, N) distance block held at once.
    """
    xy = np.asarray(xy, dtype=np.float64)  # (N, 2)
    codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1]  # (N,)
    n = len(codes)
    k = min(int(k), n - 1)
    if k < 1:
        return float("nan")
    same = 0.0
    for start in range(0, n, chunk):
        block = xy[start : start + chunk]  # (C, 2)
        d = ((block[:, None, :] - xy[None, :, :]) ** 2).sum(-1)  # (C, N)
        d[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf  # not its own neighbour
        near = np.argpartition(d, k, axis=1)[:, :k]  # (C, k)
        same += (codes[near] == codes[start : start + len(block), None]).sum()
    return float(same / (n * k))


def shuffled_purity(groups: list[str] | np.ndarray) -> float:
    """The kNN purity expected when the groups are shuffled over the points (no structure):
    sum over groups of n_g (n_g - 1) / (N (N - 1)), exactly, whatever k."""
    _, counts = np.unique(np.asarray(groups, dtype=object).astype(str), return_counts=True)
    n = counts.sum()
    return float((counts * (counts - 1)).sum() / (n * (n - 1))) if n > 1 else float("nan")
