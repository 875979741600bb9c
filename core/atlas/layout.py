"""Prototype geometry: the atlas (a 2-D UMAP map of the prototypes, cached in
``BUNDLE/index/atlas.json``) and the hidden states of their neighbourhoods (coherence).

The input is the L2-normalised prototype keys K_j / |K_j| under the cosine metric (the
head scores tokens by cos(h, K_j) up to a norm, so keys close on the map fire on similar
hidden states). The file stores the coordinates with the arguments that produced them and
the model fingerprint; :func:`build_atlas` reuses it when both match and recomputes it
otherwise. UMAP runs seeded (single-threaded, hence deterministic) and offline.

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
from core.bundle import model_fingerprint
from core.errors import AtlasError, PrototypeIndexError
from core.index.format import PrototypeIndex, index_dir, register_index_file
from core.model.head import active_prototypes, prototype_scores

logger = logging.getLogger(__name__)

ATLAS_FILE = "atlas.json"
ATLAS_FORMAT = 1
METRIC = "cosine"
CONTEXT_TOKENS = 64  # at most this many tokens re-read before each neighbour's trigger
FORWARD_BATCH = 128


def _arguments(n_neighbors: int, min_dist: float, seed: int) -> dict:
    return {
        "n_neighbors": n_neighbors,
        "min_dist": min_dist,
        "seed": seed,
        "metric": METRIC,
        "input": "L2-normalised prototype keys",
    }


def _prototype_keys(bundle_dir: Path) -> np.ndarray:
    """(P, d) float64 prototype keys, read from the bundle's weights."""
    from core.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    if not bundle.is_prism:
        raise AtlasError(f"{bundle_dir} is a dense twin: only PRISM models have prototypes to map")
    return bundle.model.prototypes.keys.detach().double().cpu().numpy()


def umap_coordinates(keys: np.ndarray, n_neighbors: int, min_dist: float, seed: int) -> np.ndarray:
    """(P, 2) float32 UMAP coordinates of the normalised (P, d) keys (cosine metric)."""
    import umap  # imported here: numba compiles on first use, and core does no work at import

    unit = keys / np.clip(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12, None)  # (P, d)
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


def build_atlas(bundle_dir: str | Path, *, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> np.ndarray:
    """UMAP coordinates of every prototype, from the cache when its arguments and model match.

    Args:
        bundle_dir: an indexed PRISM bundle.
        n_neighbors: UMAP's neighbourhood size (2 .. P - 1).
        min_dist: UMAP's minimum distance between points on the map (0 .. 1).
        seed: UMAP's random state.

    Returns:
        (P, 2) float32 coordinates, row j for prototype j.

    Raises:
        AtlasError: bad arguments or a dense bundle.
        PrototypeIndexError: the bundle has no index folder to keep the atlas in.
    """
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 2:
        raise AtlasError(f"n_neighbors must be an integer >= 2, got {n_neighbors!r}")
    if not 0.0 <= float(min_dist) <= 1.0:
        raise AtlasError(f"min_dist must lie in [0, 1], got {min_dist!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise AtlasError(f"seed must be a non-negative integer, got {seed!r}")
    bundle_dir = Path(bundle_dir)
    folder = index_dir(bundle_dir)
    if not (folder / "meta.json").is_file():
        raise PrototypeIndexError(f"{bundle_dir} has no index; build it with {store.rebuild_hint(bundle_dir)}")
    fingerprint = model_fingerprint(bundle_dir)
    arguments = _arguments(n_neighbors, float(min_dist), seed)
    path = folder / ATLAS_FILE
    record = _read_atlas(path)
    if _valid(record, arguments, fingerprint, None):
        logger.info("atlas: reusing %s", path)
        return np.asarray(record["coordinates"], dtype=np.float32)
    keys = _prototype_keys(bundle_dir)  # (P, d)
    if n_neighbors >= len(keys):
        raise AtlasError(f"n_neighbors must be below the number of prototypes ({len(keys)}), got {n_neighbors}")
    coords = umap_coordinates(keys, n_neighbors, float(min_dist), seed)
    payload = {
        "format_version": ATLAS_FORMAT,
        "model_fingerprint": fingerprint,
        "arguments": arguments,
        "coordinates": [[round(float(x), 5), round(float(y), 5)] for x, y in coords],
    }
    store.write_json(path, payload)
    register_index_file(folder, ATLAS_FILE)
    return np.asarray(payload["coordinates"], dtype=np.float32)


def load_atlas(bundle_dir: str | Path) -> np.ndarray | None:
    """The cached (P, 2) coordinates, or None when absent or made for other weights."""
    bundle_dir = Path(bundle_dir)
    record = _read_atlas(index_dir(bundle_dir) / ATLAS_FILE)
    if record is None:
        return None
    if not _valid(record, None, model_fingerprint(bundle_dir), None):
        logger.warning("atlas in %s belongs to other weights; run `prism label --model %s`", bundle_dir, bundle_dir)
        return None
    return np.asarray(record["coordinates"], dtype=np.float32)


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
