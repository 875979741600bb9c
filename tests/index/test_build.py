"""The index build: one position per document with snippets, refusal of another corpus or
model, independence from the batch size, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.attribution.engine import attribute
from core.bundle import load_bundle, write_bundle
from core.data.corpus import CorpusError, load_corpus
from core.errors import PrototypeIndexError
from core.index.build import build_index
from core.index.format import index_dir, load_index
from tests.helpers import COMPLETION, PROMPT, unindexed_copy, write_jsonl


def test_neighbourhoods_one_position_per_document_with_snippets(planted):
    bundle, index = planted
    assert index.usage_share.sum() == pytest.approx(1.0)
    assert index.promoted_token_ids.shape == (128, 10)
    for prototype in range(index.num_prototypes):
        neighbours = index.neighbourhood(prototype)
        assert len({n["doc_index"] for n in neighbours}) == len(neighbours)
        active = [n["cosine"] for n in neighbours if n["active"]]
        assert active == sorted(active, reverse=True)
    decoded = same = 0
    for row in range(len(index.snippets)):
        record = index.example(row)
        token = bundle.tokenizer.decode([record["token_id"]])
        if "\ufffd" not in token:  # byte-level tokens that split a character decode to U+FFFD
            decoded += 1
            same += record["snippet"][record["highlight_start"] : record["highlight_end"]] == token
    assert same == decoded > 0


def test_index_refuses_other_corpus_and_other_model(planted_bundle, planted_corpus, small_corpus, tmp_path):
    load_index(planted_bundle, corpus_fingerprint=load_corpus(planted_corpus).fingerprint)  # the right one loads
    with pytest.raises(PrototypeIndexError, match="built from corpus .* not this corpus"):
        load_index(planted_bundle, corpus_fingerprint=load_corpus(small_corpus).fingerprint)
    other = Path(shutil.copytree(planted_bundle, tmp_path / "other"))
    bundle = load_bundle(other)
    bundle.model.prototypes.values.mul_(1.01)  # other weights, same shapes
    write_bundle(other, bundle.model, bundle.tokenizer, bundle.training)  # leaves index/ in place
    with pytest.raises(PrototypeIndexError, match="built for model .* not this model"):
        load_index(other)
    with pytest.raises(PrototypeIndexError, match="built for model"):
        attribute(load_bundle(other), load_index(planted_bundle), PROMPT, COMPLETION)


def test_scores_do_not_depend_on_index_batch_size(planted_bundle, planted_corpus, tmp_path):
    indexes = []
    for batch_size in (1, 7):
        copy = unindexed_copy(planted_bundle, tmp_path / f"b{batch_size}")
        build_index(copy, planted_corpus, batch_size=batch_size, max_tokens=3000, dtype="float64", show_progress=False)
        indexes.append((load_bundle(copy), load_index(copy)))
    (bundle_a, a), (bundle_b, b) = indexes
    assert a.meta["sequences"] == b.meta["sequences"] == 47
    np.testing.assert_array_equal(a.usage_count, b.usage_count)

    def slots(index) -> np.ndarray:  # (P, M) each neighbour's global position, sorted per prototype
        rows = index.neighbour_row
        slot = index.positions["sequence"][rows] * 64 + index.positions["offset"][rows]
        return np.sort(np.where(rows >= 0, slot, -1), axis=1)

    np.testing.assert_array_equal(slots(a), slots(b))
    np.testing.assert_allclose(np.sort(a.cosine, axis=1), np.sort(b.cosine, axis=1), rtol=1e-12, atol=1e-12)
    scores = [
        {e.doc_id: e.score for e in attribute(bundle, index, PROMPT, COMPLETION, top=1000).examples}
        for bundle, index in indexes
    ]
    assert scores[0].keys() == scores[1].keys()
    assert scores[0] == pytest.approx(scores[1], rel=1e-12, abs=1e-12)


def test_index_is_written_atomically(planted_bundle, tmp_path):
    copy = unindexed_copy(planted_bundle, tmp_path / "copy")
    with pytest.raises(CorpusError, match="corpus not found"):
        build_index(copy, tmp_path / "moved.jsonl", show_progress=False)
    assert not index_dir(copy).exists() and not list(copy.glob(".index-*"))
    # A failed rebuild keeps the previous index intact.
    meta = (index_dir(planted_bundle) / "meta.json").read_text()
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": i, "text": "Too short.", "source": "x"} for i in "abc"])
    with pytest.raises(PrototypeIndexError, match="is not the corpus the model in .* was trained on"):
        build_index(planted_bundle, short, show_progress=False)  # not the training corpus: refused
    assert (index_dir(planted_bundle) / "meta.json").read_text() == meta
    assert not list(planted_bundle.glob(".index-*"))
    # A model whose record names no training corpus is indexed on any, but not on too short a one.
    record = json.loads((copy / "training.json").read_text())
    record.pop("corpus_fingerprint")
    (copy / "training.json").write_text(json.dumps(record))
    with pytest.raises(PrototypeIndexError, match="shorter than one sequence"):
        build_index(copy, short, show_progress=False)
    assert not index_dir(copy).exists() and not list(copy.glob(".index-*"))
    recorded = json.loads(meta)
    assert recorded["arguments"]["top_m"] == 32 and recorded["build_seconds"] > 0
