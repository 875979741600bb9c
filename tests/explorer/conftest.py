"""Fixtures of the explorer tests: a tiny bundle indexed and labelled on the hostile corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.atlas.labels import build_labels
from core.index.build import build_index
from tests.explorer import hostile
from tests.helpers import demo_rows, train_tiny, write_jsonl


@pytest.fixture(scope="session")
def hostile_bundle(tmp_path_factory) -> Path:
    """A tiny bundle trained, indexed and labelled on demo text plus the hostile documents.

    The hostile documents carry hostile source names, so the dominant sources, legend names and
    label categories of some prototypes are hostile strings too.
    """
    root = tmp_path_factory.mktemp("hostile")
    rows = demo_rows(20, max_chars=500) + hostile.documents(40)
    corpus = root / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "train.jsonl", rows)
    write_jsonl(corpus / "validation.jsonl", demo_rows(2, max_chars=300))
    bundle = train_tiny(corpus, root / "hostile", steps=60)
    build_index(bundle, corpus, top_m=16, show_progress=False)
    build_labels(bundle, progress=False)
    # a labels file is a bundle's text like any other: give some prototypes hostile categories and roles
    path = bundle / "index" / "labels.json"
    payload = json.loads(path.read_text(encoding="utf-8"))
    for record in payload["labels"][::3]:
        record["category"] = hostile.SOURCES[record["id"] % 2]
        record["role"] = hostile.HOSTILE[record["id"] % len(hostile.HOSTILE)]
    path.write_text(json.dumps(payload), encoding="utf-8")
    return bundle
