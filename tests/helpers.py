"""Builders and checks shared by the tests: real demo documents, JSONL files, the CLI runner.

Fixtures live in conftest.py; plain functions and constants live here and are imported.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_CORPUS = REPO / "assets" / "corpus"
APP = str(REPO / "explorer" / "app.py")

# A made-up sentence planted in a corpus; attribution must find its copies.
CANARY = "The zorblax quivered under the violet moon of Tharsis."
PROMPT, COMPLETION = "The zorblax quivered under", " the violet moon of Tharsis."

# Corpus text that must be shown as text, never rendered as HTML.
EVIL = "<script>alert('x')</script> and <img src=x onerror=alert(1)>"
EVIL_ESCAPED = ("&lt;script&gt;", "&lt;img s", "onerror=alert(1)&gt;")  # a trigger <mark> may split a word


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


def train_tiny(corpus: Path, out: Path, steps: int = 120) -> Path:
    """A tiny PRISM bundle trained for ``steps`` steps on ``corpus`` (seconds on 2 cores): a
    bundle whose index is to be built from some corpus must be trained on that corpus."""
    from core.train.trainer import TrainOptions, train

    train(TrainOptions(corpus=str(corpus), out=str(out), preset="tiny", max_steps=steps, device="cpu", progress=False))
    return out


def unindexed_copy(bundle: Path, dest: Path) -> Path:
    """A copy of a bundle without its index."""
    return Path(shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns("index", ".index-*")))


def run(argv, capsys) -> tuple[int, str, str]:
    """Run the `prism` CLI in-process: (exit code, stdout, stderr)."""
    from core.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 1 with exactly one `prism: error:` line that contains every needle, no traceback."""
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("prism: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
