"""Shared fixtures: every test seeded (random, numpy, torch); a small real corpus cut from the demo
corpus; tiny PRISM bundles trained on it inside the test run (seconds on 2 CPU cores), one of them
on a corpus with a planted sentence and one indexed on a corpus whose documents carry HTML/JS."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from core.bundle import load_bundle
from core.index.build import build_index
from core.index.format import load_index
from tests.helpers import CANARY, EVIL, demo_rows, train_tiny, write_jsonl


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request, monkeypatch):
    """Commands run on the CPU (their default device is $PRISM_DEVICE, else CUDA when present), so
    that same-seed results are bit-identical on a GPU machine too; `gpu` tests choose their own."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("PRISM_DEVICE", "cpu")
        monkeypatch.delenv("PRISM_DTYPE", raising=False)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` on a machine without CUDA, with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~400 real documents from the five demo sources, as one JSONL file."""
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    return write_jsonl(path, demo_rows(80))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, small_corpus) -> Path:
    """A tiny PRISM bundle trained for 120 steps on the small corpus."""
    return train_tiny(small_corpus, tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def loaded(tiny_bundle):
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="session")
def planted_corpus(tmp_path_factory) -> Path:
    """50 short demo documents and 8 copies of a made-up sentence (about 2% of the tokens)."""
    rows = demo_rows(10, max_chars=400)
    rows += [{"id": f"canary-{i}", "text": CANARY, "source": "canary"} for i in range(8)]
    random.Random(0).shuffle(rows)
    return write_jsonl(tmp_path_factory.mktemp("planted") / "planted.jsonl", rows)


@pytest.fixture(scope="session")
def planted_bundle(tmp_path_factory, planted_corpus) -> Path:
    """A tiny PRISM model (128 prototypes) trained 250 steps on the planted corpus, indexed."""
    from core.train.trainer import TrainOptions, train

    out = tmp_path_factory.mktemp("planted_bundle") / "tiny"
    train(
        TrainOptions(
            corpus=str(planted_corpus),
            out=str(out),
            preset="tiny",
            max_steps=250,
            device="cpu",
            progress=False,
            overrides={"num_prototypes": 128},
        )
    )
    build_index(out, planted_corpus, show_progress=False)
    return out


@pytest.fixture(scope="session")
def planted(planted_bundle):
    return load_bundle(planted_bundle), load_index(planted_bundle)


@pytest.fixture(scope="session")
def explorer_bundle(tmp_path_factory) -> Path:
    """A tiny bundle trained and indexed on a corpus where some documents carry HTML/JS (an
    index is only ever built from the corpus its model was trained on)."""
    root = tmp_path_factory.mktemp("explorer")
    rows = demo_rows(40, max_chars=600)
    rows += [{"id": f"evil-{i}", "source": "web", "text": f"Note {i}: {EVIL} end of note {i}."} for i in range(12)]
    corpus = root / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "train.jsonl", rows)
    write_jsonl(corpus / "validation.jsonl", demo_rows(2, max_chars=300))
    bundle = train_tiny(corpus, root / "bundle")
    build_index(bundle, corpus, top_m=16, show_progress=False)
    return bundle
