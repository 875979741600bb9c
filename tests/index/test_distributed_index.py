"""`prism index` under torchrun (2 CPU ranks, gloo) builds the index of one process.

The acceptance command of issue 18 on the tiny bundle, cut to 64 sequences (about 45 s on 2
busy cores, most of it the ranks' start and rank 0's labels and atlas, which are not sharded). Both builds use batches
that split at the shard boundary, so each forward pass sees the same sequences either way; what
may differ is the order of float sums (curvature blocks and the documents on both shards), the
int8 rounding that follows from it, and the choice between equal keys in a neighbourhood.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core import commands
from core.attribution.engine import attribute
from core.attribution.influence.store import ROW_ARRAYS
from core.bundle import load_bundle
from core.cli import main
from core.data.corpus import load_corpus, pack
from core.index.format import index_dir, load_index
from core.store import read_safetensors
from tests.helpers import REPO, unindexed_copy

SEQUENCES = 64  # 2 shards of 32: index batches of 16, influence batches of 8
OPTIONS = ["--top-m", "8", "--curvature-tokens", "2048", "--no-spans", "--device", "cpu", "--quiet"]
INT8 = {*ROW_ARRAYS, "document_blocks"}  # quantised: a float-rounding difference may move one step


def _keys(index) -> np.ndarray:
    """(P, M) each neighbour's ranking key: the cosine where active, cosine - 3 elsewhere, -inf empty."""
    return np.where(index.neighbour_row < 0, -np.inf, index.cosine.astype(np.float64) - 3 * (1 - index.active))


def _neighbours(index, prototype: int) -> dict[int, tuple]:
    """Global position (sequence * T + offset) -> (cosine, weight, active, code ids, code cosines, doc, char)."""
    T = index.meta["seq_len"]
    p = index.positions
    out = {}
    for slot, row in enumerate(index.neighbour_row[prototype]):
        if row >= 0:
            position = int(p["sequence"][row]) * T + int(p["offset"][row])
            out[position] = (
                float(index.cosine[prototype, slot]),
                float(index.weight[prototype, slot]),
                bool(index.active[prototype, slot]),
                p["code_ids"][row].tolist(),
                p["code_cosine"][row],
                int(p["doc_index"][row]),
                int(p["char_offset"][row]),
            )
    return out


def assert_same_neighbourhoods(one, two, tol: float = 1e-5) -> None:
    """The same neighbours per prototype, up to float tolerance; a neighbour whose key ties
    (within ``tol``) with the last kept one may be another position of equal key."""
    assert one.neighbour_row.shape == two.neighbour_row.shape
    np.testing.assert_array_equal(one.usage_count, two.usage_count)
    np.testing.assert_allclose(one.usage_share, two.usage_share, rtol=1e-12)
    np.testing.assert_array_equal(one.promoted_token_ids, two.promoted_token_ids)
    keys_one, keys_two = _keys(one), _keys(two)
    np.testing.assert_allclose(keys_one, keys_two, atol=tol)  # both sorted, best first
    for j in range(one.num_prototypes):
        a, b = _neighbours(one, j), _neighbours(two, j)
        last = keys_one[j][np.isfinite(keys_one[j])].min(initial=np.inf)
        for position, entry in a.items():
            key = entry[0] - 3 * (not entry[2])
            if key <= last + tol and position not in b:
                continue  # tied with the M-th place: the other build may keep an equal one
            assert position in b, (j, position)
            other = b[position]
            assert entry[2:4] == other[2:4] and entry[5:] == other[5:], (j, position)
            np.testing.assert_allclose(entry[:2], other[:2], atol=tol)
            np.testing.assert_allclose(entry[4], other[4], atol=tol)


def assert_same_influence(one: dict, two: dict, rtol: float = 1e-4) -> None:
    """Equal integer arrays, int8 rows within one step, floats to ``rtol``; the eigenvectors
    (whose signs are arbitrary) through the inverse they make, U diag(w) U^T."""
    assert one.keys() == two.keys()
    for name in one:
        a, b = one[name], two[name]
        assert a.shape == b.shape, name
        if name in INT8:
            assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max(initial=0) <= 1, name
        elif name == "eigenvectors":
            w1, w2 = one["inverse_weights"], two["inverse_weights"]
            inv1 = np.einsum("pir,pr,pjr->pij", a.astype(np.float64), w1, a.astype(np.float64))
            inv2 = np.einsum("pir,pr,pjr->pij", b.astype(np.float64), w2, b.astype(np.float64))
            np.testing.assert_allclose(inv1, inv2, rtol=rtol, atol=rtol * np.abs(inv1).max())
        elif np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(a).max(initial=0), err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_torchrun_two_ranks_build_the_index_of_one_process(tiny_bundle, small_corpus, tmp_path, monkeypatch):
    bundle = load_bundle(tiny_bundle)
    T = bundle.model.config.sequence_length
    packed = pack(load_corpus(small_corpus).train, bundle.tokenizer, T)
    half = SEQUENCES // 2
    # the case the merges are for: a document on both shards
    assert packed[half - 1]["doc_index"][-1] == packed[half]["doc_index"][0] >= 0
    options = ["--corpus", str(small_corpus), "--max-tokens", str(SEQUENCES * T), *OPTIONS]

    one = unindexed_copy(tiny_bundle, tmp_path / "one")
    with monkeypatch.context() as patch:  # labels and atlas: neither sharded nor compared, so spared here
        patch.setattr(commands, "_label_and_map", lambda *args, **kwargs: {})
        assert main(["index", "--model", str(one), *options]) == 0

    two = unindexed_copy(tiny_bundle, tmp_path / "two")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "core", "index", "--model", str(two), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # rank 0 alone printed (one JSON document)
    assert summary["path"] == str(index_dir(two)) and summary["sequences"] == SEQUENCES
    assert json.loads((index_dir(two) / "meta.json").read_text())["ranks"] == 2
    assert not list(Path(tmp_path).glob(".two.index-staging-*"))  # staging swapped in and removed once

    index_one, index_two = load_index(one), load_index(two)
    assert_same_neighbourhoods(index_one, index_two)
    files = [read_safetensors(index_dir(b) / "influence.safetensors")[0] for b in (one, two)]
    assert_same_influence(*files)

    for method in ("neighbourhood", "influence"):
        results = [
            attribute(load_bundle(b), index, "The history of", " the", top=3, method=method)
            for b, index in ((one, index_one), (two, index_two))
        ]
        assert [e.doc_index for e in results[0].examples] == [e.doc_index for e in results[1].examples]
        assert [e.score for e in results[0].examples] == pytest.approx([e.score for e in results[1].examples], rel=1e-3)
