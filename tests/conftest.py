"""Shared fixtures: a small real corpus cut from the demo corpus, and a tiny PRISM bundle
trained on it inside the test run (seconds on 2 CPU cores)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DEMO_CORPUS = REPO / "assets" / "corpus"


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def demo_rows(per_source: int, max_chars: int = 1500) -> list[dict]:
    """The first ``per_source`` training documents of each demo source, cut to ``max_chars``."""
    taken: dict[str, int] = {}
    rows = []
    with gzip.open(DEMO_CORPUS / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if taken.get(row["source"], 0) < per_source:
                taken[row["source"]] = taken.get(row["source"], 0) + 1
                rows.append({**row, "text": row["text"][:max_chars]})
    return rows


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
    from core.bundle import load_bundle

    return load_bundle(tiny_bundle)
