"""Training: the loss falls, seeds reproduce, resume matches an uninterrupted run, bad rows."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from core.bundle import load_bundle
from core.data.corpus import CorpusError, load_corpus
from core.train.trainer import TrainingError, TrainOptions, latest_checkpoint, train
from tests.helpers import assert_one_line_error, demo_rows, run, write_jsonl


def weights(bundle_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(bundle_dir.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def test_tiny_preset_trains_and_loss_falls(tiny_bundle):
    record = json.loads((tiny_bundle / "training.json").read_text())
    history = [h["loss_ce"] for h in record["log_history"] if "loss_ce" in h]
    assert len(history) >= 5
    assert history[-1] < history[0] - 0.8  # cross-entropy drops by a real margin
    for term in ("loss_cluster", "loss_anchor", "loss_diversity", "loss_balance"):
        assert any(term in h for h in record["log_history"]), term
    assert record["val_loss"] < 6.0  # ln(512) = 6.24 is the uniform guess
    for key in ("val_loss", "train_tokens", "steps", "wall_seconds", "corpus_fingerprint"):
        assert key in record
    assert record["steps"] == 120


def test_same_seed_same_model_and_resume_matches(tmp_path, small_corpus):
    common = dict(corpus=str(small_corpus), preset="tiny", max_steps=40, save_steps=25, device="cpu", progress=False)
    straight = tmp_path / "straight"
    train(TrainOptions(out=str(straight), **common))
    again = tmp_path / "again"
    train(TrainOptions(out=str(again), **common))
    resumed = tmp_path / "resumed"
    # Interrupted after step 27: the newest complete checkpoint is step 25 (save_steps 25).
    with pytest.raises(KeyboardInterrupt):
        train(TrainOptions(out=str(resumed), stop_after=27, **common))
    assert latest_checkpoint(resumed / "checkpoints").name == "checkpoint-25"
    train(TrainOptions(out=str(resumed), resume=True, **common))
    a, b, c = weights(straight), weights(again), weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert torch.allclose(a[name], c[name], rtol=1e-5, atol=1e-6), name


def test_dense_twin_trains_on_the_same_tokens(tmp_path, small_corpus, tiny_bundle):
    out = tmp_path / "dense"
    record = train(
        TrainOptions(
            corpus=str(small_corpus),
            out=str(out),
            preset="tiny",
            max_steps=30,
            dense=True,
            tokenizer=str(tiny_bundle),
            progress=False,
        )
    )
    prism = json.loads((tiny_bundle / "training.json").read_text())
    assert record["kind"] == "dense"
    assert record["corpus_fingerprint"] == prism["corpus_fingerprint"]
    bundle = load_bundle(out)
    assert bundle.model.prototypes is None
    assert bundle.tokenizer.get_vocab() == load_bundle(tiny_bundle).tokenizer.get_vocab()
    # the reused tokenizer is saved with its own settings, not the options of loading it
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved == json.loads((tiny_bundle / "tokenizer_config.json").read_text())


def test_invalid_utf8_rows_are_skipped_and_counted(tmp_path):
    rows = demo_rows(20)
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, rows)
    with open(path, "ab") as f:
        f.write(b'{"id": "bad-1", "text": "caf\xe9 latin-1 bytes", "source": "x"}\n')
        f.write(b"\xff\xfe not json at all\n")
        f.write(b'{"id": "bad-3", "text": "", "source": "x"}\n')
        f.write(b"{broken json\n")
    corpus = load_corpus(path)
    assert corpus.skipped_rows == {"invalid_utf8": 2, "empty_text": 1, "invalid_json": 1}
    assert len(corpus.train) + len(corpus.validation) == len(rows)
    record = train(TrainOptions(corpus=str(path), out=str(tmp_path / "m"), preset="tiny", max_steps=5, progress=False))
    assert record["skipped_rows"]["invalid_utf8"] == 2


def test_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CorpusError, match="no usable documents"):
        load_corpus(tmp_path / "empty.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        load_corpus(tmp_path / "folder")
    with pytest.raises(TrainingError, match="unknown preset"):
        TrainOptions(corpus="x", out="y", preset="huge")


def test_split_is_by_document_and_stable(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", demo_rows(40))
    first, second = load_corpus(path), load_corpus(path)
    assert first.validation["id"] == second.validation["id"]
    assert len(first.validation) >= 1
    assert not set(first.train["id"]) & set(first.validation["id"])


def test_folder_of_txt_files(tmp_path):
    for source in ("poems", "notes"):
        (tmp_path / source).mkdir()
        for i in range(3):
            (tmp_path / source / f"{i}.txt").write_text(f"{source} document {i} " * 20)
    corpus = load_corpus(tmp_path)
    docs = list(corpus.train) + list(corpus.validation)
    assert len(docs) == 6
    assert {d["source"] for d in docs} == {"poems", "notes"}
    assert {d["id"] for d in docs} == {f"{s}/{i}.txt" for s in ("poems", "notes") for i in range(3)}


def test_single_document_corpus_loads(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", demo_rows(1)[:1])
    corpus = load_corpus(path)
    assert len(corpus.train) == 1 and len(corpus.validation) == 0


def test_completion_marker_is_removed_before_a_checkpoint_is_rewritten(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from transformers import Trainer

    from core.train.trainer import COMPLETE_MARKER, PrismTrainer

    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    (folder / COMPLETE_MARKER).write_text("ok\n")  # left by an earlier run
    marked_while_writing = []
    monkeypatch.setattr(
        Trainer,
        "_save_checkpoint",
        lambda self, model, trial: marked_while_writing.append((folder / COMPLETE_MARKER).exists()),
    )
    trainer = PrismTrainer.__new__(PrismTrainer)
    trainer.args = SimpleNamespace(output_dir=str(tmp_path))
    trainer.state = SimpleNamespace(global_step=7)
    trainer._save_checkpoint(None, None)
    assert marked_while_writing == [False]
    assert (folder / COMPLETE_MARKER).exists()


def test_sparsity_flags_reach_the_config(tmp_path, capsys, small_corpus):
    common = ["train", "--corpus", small_corpus, "--max-steps", "2", "--quiet", "--top-k", "4"]
    flags = ["--top-k-start", "8", "--anneal-fraction", "0.25", "--concentration-weight", "0.2", "--weight-power", "2"]
    code, _, err = run([*common, "--out", tmp_path / "m", *flags, "--learn-weight-power"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["prototype_top_k_start"], config["top_k_anneal_fraction"]) == (8, 0.25)
    assert (config["concentration_weight"], config["weight_power"], config["learn_weight_power"]) == (0.2, 2.0, True)
    code, _, err = run([*common, "--out", tmp_path / "bad", "--top-k-start", "2"], capsys)
    assert_one_line_error(code, err, "prototype_top_k_start", "2")
