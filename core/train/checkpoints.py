"""Checkpoints of a training run: which are complete, which run made them, and when a run may
write into an output folder.

A fresh run writes ``OUT/checkpoints/run.json`` (corpus fingerprint, tokenizer hash, preset,
model kind, seed, overrides) before its first step; ``--resume`` continues only a run that
matches it. A checkpoint folder counts only once its completion marker is written.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from core import store
from core.errors import TrainingError

if TYPE_CHECKING:
    from core.data.corpus import Corpus
    from core.train.trainer import TrainOptions

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
RUN_FILE = "run.json"  # in OUT/checkpoints: what made the checkpoints; --resume must match it


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint folder that was completely written, or None."""
    complete = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def check_output_folder(opts: TrainOptions) -> None:
    """Refuse to write over an existing bundle or an earlier run's checkpoints unless asked to.

    Raises:
        TrainingError: OUT is a file, or holds a bundle, checkpoints or other files, and neither
            ``overwrite`` nor (for checkpoints) ``resume`` is set.
    """
    out = Path(opts.out)
    if not out.exists():
        return
    if not out.is_dir():
        raise TrainingError(f"--out {out} is a file; give a folder for the bundle")
    if opts.overwrite or not any(out.iterdir()):
        return
    if (out / "config.json").exists():
        if opts.resume:
            return
        raise TrainingError(
            f"--out {out} already holds a bundle; give --overwrite to replace it (its index goes with it), "
            "or choose another folder"
        )
    if (out / "checkpoints").is_dir():
        if opts.resume:
            return
        raise TrainingError(
            f"{out / 'checkpoints'} holds checkpoints of an earlier run; continue it with --resume "
            "or start over with --overwrite"
        )
    raise TrainingError(f"--out {out} is a folder that is not empty; give --overwrite to use it anyway")


def run_record(opts: TrainOptions, corpus: Corpus, tokenizer) -> dict:
    """What makes a run: checkpoints carry it, and ``--resume`` continues only the same run."""
    vocabulary = tokenizer.backend_tokenizer.to_str().encode("utf-8")
    return {
        "corpus_fingerprint": corpus.fingerprint,
        "tokenizer_sha256": hashlib.sha256(vocabulary).hexdigest(),
        "preset": opts.preset,
        "dense": opts.dense,
        "seed": opts.seed,
        "overrides": {key: opts.overrides[key] for key in sorted(opts.overrides)},
        "backbone": str(Path(opts.backbone).resolve()) if opts.backbone else None,
    }


def start_run(checkpoint_dir: Path, run: dict) -> None:
    """Begin a fresh run's checkpoints: earlier ones (allowed by ``overwrite``) must not be mixed in."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True)
    store.write_json(checkpoint_dir / RUN_FILE, run, indent=2)


def check_resume(checkpoint_dir: Path, run: dict) -> None:
    """Refuse to resume checkpoints that another run (corpus, tokenizer, preset, seed) made.

    Raises:
        TrainingError: the checkpoints carry no run record or a different one.
    """
    path = checkpoint_dir / RUN_FILE
    fix = "resume with the options of that run, or start over with --overwrite"
    if not path.exists():
        raise TrainingError(f"--resume: {checkpoint_dir} does not say which run made it (no {RUN_FILE}); {fix}")
    recorded = store.read_json(path, "the run record", fix, error=TrainingError)
    if not isinstance(recorded, dict):
        raise TrainingError(f"--resume: the run record {path} is not a JSON object; {fix}")
    names = {
        "corpus_fingerprint": "another corpus",
        "tokenizer_sha256": "another tokenizer",
        "preset": "another preset",
        "dense": "another model kind (dense or PRISM)",
        "seed": "another seed",
        "overrides": "other model settings",
        "backbone": "another backbone",
    }
    for key, what in names.items():
        if recorded.get(key) != run[key]:
            raise TrainingError(
                f"--resume: the checkpoints in {checkpoint_dir} are from a run with {what} "
                f"({_short(recorded.get(key))}, this run {_short(run[key])}); {fix}"
            )


def _short(value: object) -> str:
    text = str(value)
    return text[:16] if len(text) == 64 else text  # sha256 digests in their short form


def remove_checkpoints(out: str | Path) -> None:
    """Delete out/checkpoints once a bundle is final."""
    shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)
