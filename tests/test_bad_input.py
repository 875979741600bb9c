"""Hostile and careless input (issue 15): every case ends in one `prism: error:` line naming the
file, never a traceback; nothing is trusted that does not match what made it; writes are atomic
as a whole."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.bundle import load_bundle, model_fingerprint, write_bundle
from core.data.corpus import load_corpus, train_tokenizer
from core.index.build import build_index
from core.train.trainer import TrainOptions, latest_checkpoint, train
from tests.helpers import assert_one_line_error, demo_rows, run, write_jsonl

DEEP = "[" * 200_000 + "]" * 200_000  # deeper than any recursion limit
HUGE = '{"x": ' + "9" * 5000 + "}"  # an integer longer than Python reads by default
PROMPT = ["--prompt", "The king", "--max-new-tokens", "4"]


def bundle_copy(bundle: Path, dest: Path) -> Path:
    return Path(shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns("checkpoints")))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def no_leftovers(folder: Path) -> list[str]:
    return [str(f) for f in folder.rglob("*") if f.name.endswith(".tmp") or ".staging-" in f.name or ".old-" in f.name]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_bundle, small_corpus) -> Path:
    """A copy of the tiny bundle with a small index (no labels)."""
    bundle = bundle_copy(tiny_bundle, tmp_path_factory.mktemp("indexed") / "bundle")
    build_index(bundle, small_corpus, max_tokens=2000, show_progress=False)
    return bundle


# ------------------------------------------------------------------------------ the bundle

WEIGHT_DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "zero-length": lambda data: b"",
    "garbage": lambda data: b"this is not a safetensors file " * 4,
    "header length only": lambda data: data[:8],
}


@pytest.mark.parametrize("damage", list(WEIGHT_DAMAGE))
def test_damaged_weights_file(damage, tiny_bundle, tmp_path, capsys):
    bundle = bundle_copy(tiny_bundle, tmp_path / "b")
    weights = bundle / "model.safetensors"
    weights.write_bytes(WEIGHT_DAMAGE[damage](weights.read_bytes()))
    code, _, err = run(["generate", "--model", bundle, *PROMPT], capsys)
    assert_one_line_error(code, err, str(weights), "not a readable safetensors file")


def test_weights_file_linked_to_a_device_is_refused(tiny_bundle, tmp_path, capsys):
    bundle = bundle_copy(tiny_bundle, tmp_path / "b")
    (bundle / "model.safetensors").unlink()
    (bundle / "model.safetensors").symlink_to("/dev/zero")
    code, _, err = run(["generate", "--model", bundle, *PROMPT], capsys)
    assert_one_line_error(code, err, "model.safetensors", "not a regular file")


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("hidden_size", 32, "is (512, 64) in the weights but (512, 32) by the config"),
        ("num_prototypes", 32, "prototypes.keys is (64, 64) in the weights but (32, 64) by the config"),
        ("vocab_size", 600, "is (512, 64) in the weights but (600, 64) by the config"),
        ("num_hidden_layers", 4, "num_hidden_layers is 4 but the weights hold 2 layers"),
        ("num_hidden_layers", 1, "num_hidden_layers is 1 but the weights hold 2 layers"),
    ],
)
def test_config_that_does_not_match_the_weights(field, value, needle, tiny_bundle, tmp_path, capsys):
    bundle = bundle_copy(tiny_bundle, tmp_path / "b")

    def edit(config: dict) -> None:
        (config if field in config else config["text_config"])[field] = value

    edit_json(bundle / "config.json", edit)
    code, _, err = run(["generate", "--model", bundle, *PROMPT], capsys)
    assert_one_line_error(code, err, str(bundle / "config.json"), "does not match the weights", needle)


def test_non_finite_weights_are_refused(tiny_bundle, tmp_path, capsys):
    bundle = bundle_copy(tiny_bundle, tmp_path / "b")
    tensors = load_file(bundle / "model.safetensors")
    tensors["prototypes.values"][3, 5] = float("nan")
    save_file(tensors, bundle / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run(["generate", "--model", bundle, *PROMPT], capsys)
    assert_one_line_error(code, err, "NaN or infinite", "prototypes.values")


def test_absurd_generation_config_is_refused(tiny_bundle, tmp_path, capsys):
    bundle = bundle_copy(tiny_bundle, tmp_path / "b")
    edit_json(bundle / "generation_config.json", lambda g: g.update(num_beams=4096))
    code, _, err = run(["generate", "--model", bundle, *PROMPT], capsys)
    assert_one_line_error(code, err, "generation_config.json", "num_beams=4096", "at most 8")
    (bundle / "generation_config.json").write_text("{broken")
    code, _, err = run(["generate", "--model", bundle, *PROMPT], capsys)
    assert_one_line_error(code, err, "generation_config.json", "not valid JSON")


def test_tokenizer_of_another_model_or_unreadable(tiny_bundle, small_corpus, tmp_path, capsys):
    bundle = bundle_copy(tiny_bundle, tmp_path / "b")
    texts = [row["text"] for row in demo_rows(20)]
    train_tokenizer(iter(texts), vocab_size=1024, model_max_length=64).save_pretrained(bundle)
    code, _, err = run(["generate", "--model", bundle, *PROMPT], capsys)
    assert_one_line_error(code, err, "tokenizer.json", "vocabulary has 512 entries")

    bundle = bundle_copy(tiny_bundle, tmp_path / "c")
    edit_json(bundle / "tokenizer.json", lambda t: t["model"]["vocab"].update({"zz": 10**12}))
    code, _, err = run(["generate", "--model", bundle, *PROMPT], capsys)
    assert_one_line_error(code, err, str(bundle / "tokenizer.json"), "cannot be read")


@pytest.mark.parametrize(("text", "needle"), [(DEEP, "nested too deeply"), (HUGE, "number too long")])
def test_config_nested_too_deeply_or_with_huge_numbers(text, needle, tiny_bundle, tmp_path, capsys):
    bundle = bundle_copy(tiny_bundle, tmp_path / "b")
    (bundle / "config.json").write_text(text)
    code, _, err = run(["generate", "--model", bundle, *PROMPT], capsys)
    assert_one_line_error(code, err, str(bundle / "config.json"), needle)


def test_edited_config_changes_the_fingerprint_and_the_old_index_is_refused(indexed, tmp_path, capsys):
    bundle = bundle_copy(indexed, tmp_path / "b")
    before = model_fingerprint(bundle)
    assert before == json.loads((bundle / "index" / "meta.json").read_text())["model_fingerprint"]
    edit_json(bundle / "config.json", lambda c: c.update(prototype_top_k=4))  # same shapes, other outputs
    assert model_fingerprint(bundle) != before
    code, _, err = run(["generate", "--model", bundle, *PROMPT], capsys)
    assert code == 0, err  # the edited model still loads (an experiment with k = 4)...
    code, _, err = run(["attribute", "--model", bundle, "--prompt", "The king", "--completion", " is"], capsys)
    assert_one_line_error(code, err, "was built for model", before)  # ...but not with the old index


# ----------------------------------------------------------------------------- the index


def damage_positions(folder: Path) -> None:
    lines = (folder / "positions.jsonl").read_text().splitlines(keepends=True)
    (folder / "positions.jsonl").write_text("".join(lines[:-3]))


def damage_documents(folder: Path) -> None:
    rows = [json.loads(line) for line in (folder / "documents.jsonl").read_text().splitlines()]
    (folder / "documents.jsonl").write_text("".join(json.dumps({"id": r["id"]}) + "\n" for r in rows))


def damage_labels(folder: Path) -> None:
    fingerprint = json.loads((folder / "meta.json").read_text())["model_fingerprint"]
    (folder / "labels.json").write_text(json.dumps({"model_fingerprint": fingerprint, "labels": [{"id": 0}]}))


def damage_neighbourhoods(folder: Path) -> None:
    data = (folder / "neighbourhoods.safetensors").read_bytes()
    (folder / "neighbourhoods.safetensors").write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        (damage_positions, ("positions.jsonl has", "rows")),
        (damage_documents, ("documents.jsonl line 1 lacks", "source")),
        (damage_labels, ("labels.json", "entry 0 lacks id, category or role", "prism label")),
        (damage_neighbourhoods, ("neighbourhoods.safetensors", "not a readable safetensors file")),
        (lambda folder: (folder / "meta.json").write_text(DEEP), ("meta.json", "nested too deeply")),
    ],
)
def test_damaged_index(damage, needles, indexed, tmp_path, capsys):
    bundle = bundle_copy(indexed, tmp_path / "b")
    damage(bundle / "index")
    code, _, err = run(["attribute", "--model", bundle, "--prompt", "The king", "--completion", " is"], capsys)
    assert_one_line_error(code, err, *needles)


# ----------------------------------------------------------------------------- the corpus


def test_damaged_gzip_corpus(tmp_path, capsys):
    data = "".join(json.dumps(row) + "\n" for row in demo_rows(5)).encode()
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(gzip.compress(data)[:2000])
    code, _, err = run(["train", "--corpus", truncated, "--out", tmp_path / "m"], capsys)
    assert_one_line_error(code, err, str(truncated), "cannot be read", "end-of-stream")
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_bytes(data)
    code, _, err = run(["train", "--corpus", plain, "--out", tmp_path / "m"], capsys)
    assert_one_line_error(code, err, str(plain), "Not a gzipped file")
    assert not (tmp_path / "m").exists()


def test_corpus_rows_nested_too_deeply_or_with_huge_numbers_are_skipped(tmp_path):
    rows = demo_rows(4)
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with open(path, "a") as f:
        f.write('{"id": "deep", "text": "x", "meta": ' + DEEP + "}\n")
        f.write('{"id": "huge", "text": "x", "n": ' + "9" * 5000 + "}\n")
    corpus = load_corpus(path)
    assert corpus.skipped_rows == {"nested_too_deeply": 1, "number_too_long": 1}
    assert len(corpus.train) + len(corpus.validation) == len(rows)


# --------------------------------------------------------- controls, tasks and prompts


@pytest.mark.parametrize("gain", [1e300, 1e38, 101.0])
def test_absurd_gains_are_refused(gain, tiny_bundle, tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"gains": {"3": gain}}))
    code, _, err = run(["generate", "--model", tiny_bundle, *PROMPT, "--controls", tmp_path / "c.json"], capsys)
    assert_one_line_error(code, err, "gain of prototype 3", "gains range from 0 to 100")


def test_infinite_gain_is_refused(tiny_bundle, tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"gains": {"3": 1e999}}')  # JSON's way to write inf
    code, _, err = run(["generate", "--model", tiny_bundle, *PROMPT, "--controls", tmp_path / "c.json"], capsys)
    assert_one_line_error(code, err, "gain of prototype 3 must be a finite number", "got inf")


def test_huge_suppression_range_is_bounded_by_the_prototype_count(tiny_bundle, capsys):
    code, _, err = run(["generate", "--model", tiny_bundle, *PROMPT, "--suppress", "0-3000000000"], capsys)
    assert_one_line_error(code, err, "0-3000000000", "out of range", "0..63")
    code, _, err = run(["target", "--model", tiny_bundle, "--ids", "5,0-3000000000"], capsys)
    assert_one_line_error(code, err, "out of range", "0..63")


@pytest.mark.parametrize(("text", "needle"), [(DEEP, "nested too deeply"), (HUGE, "number too long")])
def test_deep_or_huge_controls_tasks_and_prompts(text, needle, tiny_bundle, tmp_path, capsys):
    controls = tmp_path / "controls.json"
    controls.write_text(text)
    code, _, err = run(["generate", "--model", tiny_bundle, *PROMPT, "--controls", controls], capsys)
    assert_one_line_error(code, err, str(controls), needle)
    task = tmp_path / "task.jsonl"
    task.write_text(text + "\n")
    code, _, err = run(["calibrate", "--model", tiny_bundle, "--task", task, "--out", tmp_path / "o.json"], capsys)
    assert_one_line_error(code, err, f"{task} line 1", needle)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(text + "\n")
    code, _, err = run(["report", "--model", tiny_bundle, "--prompts", prompts, "--out", tmp_path / "r.html"], capsys)
    assert_one_line_error(code, err, f"{prompts}:1", needle)


# ---------------------------------------------------------------------- whole-artifact writes


def test_write_bundle_interrupted_at_every_rename_keeps_the_previous_bundle(tiny_bundle, tmp_path, monkeypatch):
    previous = load_bundle(tiny_bundle)
    model = previous.model
    with torch.no_grad():
        model.prototypes.values.mul_(1.01)  # other weights, same shapes (the loaded copy only)
    real_replace = os.replace
    calls = []

    def counting(src, dst):
        calls.append(dst)
        return real_replace(src, dst)

    scratch = bundle_copy(tiny_bundle, tmp_path / "scratch")
    (scratch / "index").mkdir()
    monkeypatch.setattr(os, "replace", counting)
    write_bundle(scratch, model, previous.tokenizer, previous.training)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(calls) >= 4 and (scratch / "index").is_dir()

    for step in range(len(calls)):
        folder = bundle_copy(tiny_bundle, tmp_path / f"step{step}" / "bundle")
        (folder / "index").mkdir()
        (folder / "index" / "meta.json").write_text("{}")
        before = snapshot(folder)
        seen = []

        def failing(src, dst, step=step, seen=seen):
            seen.append(dst)
            if len(seen) == step + 1:
                raise KeyboardInterrupt
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", failing)
        with pytest.raises(KeyboardInterrupt):
            write_bundle(folder, model, previous.tokenizer, previous.training)
        monkeypatch.setattr(os, "replace", real_replace)
        assert snapshot(folder) == before, step
        assert load_bundle(folder).fingerprint == previous.fingerprint
        assert no_leftovers(folder.parent) == []


def test_train_refuses_an_existing_bundle_unless_overwrite(tiny_bundle, small_corpus, tmp_path, capsys):
    bundle = bundle_copy(tiny_bundle, tmp_path / "b")
    (bundle / "index").mkdir()
    (bundle / "index" / "meta.json").write_text("{}")
    before = snapshot(bundle)
    argv = ["train", "--corpus", small_corpus, "--out", bundle, "--max-steps", "2", "--quiet"]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, str(bundle), "already holds a bundle", "--overwrite")
    assert snapshot(bundle) == before
    code, _, err = run([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((bundle / "training.json").read_text())["steps"] == 2
    assert not (bundle / "index").exists()  # the old weights' index went with them
    assert no_leftovers(tmp_path) == []


def test_resume_refuses_another_run(small_corpus, tmp_path, capsys):
    out = tmp_path / "m"
    common = dict(corpus=str(small_corpus), out=str(out), preset="tiny", max_steps=4, save_steps=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(TrainOptions(stop_after=3, **common))
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint-2"
    capsys.readouterr()  # the interrupted run's own output
    argv = ["train", "--corpus", small_corpus, "--out", out, "--max-steps", "4", "--quiet"]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "holds checkpoints of an earlier run", "--resume", "--overwrite")
    code, _, err = run([*argv, "--resume", "--seed", "1"], capsys)
    assert_one_line_error(code, err, "from a run with another seed (0, this run 1)")
    other = write_jsonl(tmp_path / "other.jsonl", demo_rows(60)[::-1])
    code, _, err = run(["train", "--corpus", other, "--out", out, "--max-steps", "4", "--resume", "--quiet"], capsys)
    assert_one_line_error(code, err, "from a run with another corpus")


def test_interrupted_index_does_not_offer_resume(indexed, small_corpus, capsys, monkeypatch):
    import core.index.build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(core.index.build, "build_index", interrupted)
    code, _, err = run(["index", "--model", indexed, "--corpus", small_corpus, "--quiet"], capsys)
    assert code == 130
    assert "interrupted" in err and "--resume" not in err


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        (["report", "--prompts", "PROMPTS", "--out", "missing/r.html"], "does not exist"),
        (["calibrate", "--task", "TASK", "--out", "."], "is a folder"),
        (["target", "--ids", "1,2", "--out", "missing/c.json"], "does not exist"),
    ],
)
def test_bad_out_fails_before_the_work(command, needle, tmp_path, capsys, monkeypatch):
    (tmp_path / "prompts.txt").write_text("The king\n")
    (tmp_path / "task.jsonl").write_text(
        "".join(json.dumps({"prompt": "a", "choices": ["b", "c"], "answer": 0}) + "\n" for _ in range(4))
    )
    monkeypatch.chdir(tmp_path)
    argv = [{"PROMPTS": "prompts.txt", "TASK": "task.jsonl"}.get(a, a) for a in command]
    code, _, err = run([*argv, "--model", tmp_path / "no-such-bundle"], capsys)  # the model is never reached
    assert_one_line_error(code, err, "--out", needle)
    assert no_leftovers(tmp_path) == []


def test_unexpected_error_is_one_line_with_the_way_to_the_traceback(tiny_bundle, capsys, monkeypatch):
    import core.generation

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nwith a second line")

    monkeypatch.setattr(core.generation, "generate_text", broken)
    code, _, err = run(["generate", "--model", tiny_bundle, *PROMPT], capsys)
    assert_one_line_error(code, err, "unexpected RuntimeError: something inside broke", "--verbose")
