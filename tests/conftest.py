"""Shared fixtures: every test seeded (random, numpy, torch); a small real corpus cut from the demo
corpus; tiny PRISM bundles trained on it inside the test run (seconds on 2 CPU cores), one of them
on a corpus with a planted sentence and one indexed on a corpus whose documents carry HTML/JS."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.bundle import load_bundle
from core.index.build import build_index
from core.index.format import load_index
from tests.helpers import CANARY, EVIL, demo_rows, write_jsonl


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~400 real documents from the five demo sources, as one JSONL file."""
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    return write_jsonl(path, demo_rows(80))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, small_corpus) -> Path:
    """A tiny PRISM bundle trained for 120 steps on the small corpus."""
    from core.train.trainer import TrainOptions, train

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    train(TrainOptions(corpus=str(small_corpus), out=str(out), preset="tiny", max_steps=120, progress=False))
    return out


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
def explorer_bundle(tmp_path_factory, tiny_bundle) -> Path:
    """A copy of the tiny bundle indexed on a corpus where some documents carry HTML/JS."""
    root = tmp_path_factory.mktemp("explorer")
    bundle = Path(shutil.copytree(tiny_bundle, root / "bundle", ignore=shutil.ignore_patterns("index")))
    rows = demo_rows(40, max_chars=600)
    rows += [{"id": f"evil-{i}", "source": "web", "text": f"Note {i}: {EVIL} end of note {i}."} for i in range(12)]
    corpus = root / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "train.jsonl", rows)
    write_jsonl(corpus / "validation.jsonl", demo_rows(2, max_chars=300))
    build_index(bundle, corpus, top_m=16, show_progress=False)
    return bundle
