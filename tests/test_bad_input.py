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

    # The bundle's own renames; the user's weight-digest cache (written after the swap) is no part of it.
    def counting(src, dst):
        if str(dst).startswith(str(tmp_path)):
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
            if str(dst).startswith(str(tmp_path)):
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


# ------------------------------------------------- a whole index: spans, labels, atlas, influence

SMALL_INDEX = ["--quiet", "--max-tokens", "256", "--curvature-tokens", "256", "--top-m", "8"]


def snapshot_all(*paths: Path) -> dict[str, bytes]:
    """Every file under (or at) each path, by absolute name."""
    files = {}
    for p in paths:
        for f in [p] if p.is_file() else sorted(p.rglob("*")):
            if f.is_file():
                files[str(f)] = f.read_bytes()
    return files


def assert_index_loads(bundle: Path, influence: bool = True) -> None:
    """The bundle's whole index is usable: neighbourhoods, labels, atlas, spans and influence."""
    from core.atlas.labels import load_labels
    from core.atlas.layout import load_atlas
    from core.attribution.influence import load_influence
    from core.attribution.spans_index import load_spans
    from core.index.format import load_index

    assert load_index(bundle).labels
    assert load_labels(bundle) and load_atlas(bundle) is not None
    load_spans(bundle)
    if influence:
        load_influence(bundle)


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_bundle, small_corpus) -> Path:
    """A copy of the tiny bundle indexed by `prism index` (neighbourhoods, spans, labels, atlas
    and influence factors), over its first training tokens."""
    bundle = bundle_copy(tiny_bundle, tmp_path_factory.mktemp("full") / "bundle")
    from core.cli import main

    assert main(["index", "--model", str(bundle), "--corpus", str(small_corpus), *SMALL_INDEX]) == 0
    assert_index_loads(bundle)
    return bundle


def test_index_from_another_corpus_is_refused(full, small_corpus, tmp_path, capsys):
    bundle = bundle_copy(full, tmp_path / "b")
    other = write_jsonl(tmp_path / "other.jsonl", demo_rows(30)[::-1])
    before = snapshot(bundle)
    code, _, err = run(["index", "--model", bundle, "--corpus", other, *SMALL_INDEX], capsys)
    assert_one_line_error(code, err, str(other), "is not the corpus the model in", "was trained on")
    assert snapshot(bundle) == before and no_leftovers(tmp_path) == []
    # An index that was built from another corpus (its record says so) is refused, not warned about.
    edit_json(bundle / "index" / "meta.json", lambda m: m.update(corpus_fingerprint="0" * 64))
    code, _, err = run(["attribute", "--model", bundle, "--prompt", "The king", "--completion", " is"], capsys)
    assert_one_line_error(code, err, str(bundle / "index"), "is not the corpus the model in", "prism index")


def _rewrite_header(path: Path, **changes: str) -> None:
    from core.store import read_safetensors, write_safetensors

    arrays, header = read_safetensors(path)
    meta = json.loads(header["meta"])
    write_safetensors(path, arrays, metadata={**header, "meta": json.dumps({**meta, **changes})})


@pytest.mark.parametrize(
    ("name", "changes", "needles"),
    [
        ("influence.safetensors", {"corpus_fingerprint": "0" * 64}, ("influence factors", "another corpus")),
        ("influence.safetensors", {"model_fingerprint": "0" * 16}, ("influence factors", "not this model")),
        ("spans.safetensors", {"corpus_fingerprint": "0" * 64}, ("span index", "another corpus")),
        ("spans.safetensors", {"model_fingerprint": "0" * 16}, ("span index", "not this model")),
    ],
    ids=["influence-corpus", "influence-model", "spans-corpus", "spans-model"],
)
def test_influence_or_spans_of_another_corpus_or_model_are_refused(name, changes, needles, full, tmp_path, capsys):
    bundle = bundle_copy(full, tmp_path / "b")
    _rewrite_header(bundle / "index" / name, **changes)
    method = "influence" if name.startswith("influence") else "spans"
    if method == "spans":
        (bundle / "index" / "influence.safetensors").unlink()  # so that auto turns to the spans
    for chosen in (method, "auto"):  # auto does not quietly fall back to another method
        argv = ["attribute", "--model", bundle, "--prompt", "The king", "--completion", " is", "--method", chosen]
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, *needles, "prism index --model")


@pytest.mark.parametrize("damage", list(WEIGHT_DAMAGE))
@pytest.mark.parametrize("name", ["influence.safetensors", "spans.safetensors"])
def test_damaged_influence_or_spans_file(name, damage, full, tmp_path, capsys):
    bundle = bundle_copy(full, tmp_path / "b")
    path = bundle / "index" / name
    path.write_bytes(WEIGHT_DAMAGE[damage](path.read_bytes()))
    method = "influence" if name.startswith("influence") else "spans"
    if method == "spans":
        (bundle / "index" / "influence.safetensors").unlink()  # so that auto turns to the spans
    for chosen in (method, "auto"):
        argv = ["attribute", "--model", bundle, "--prompt", "The king", "--completion", " is", "--method", chosen]
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, str(path), "not readable", "prism index --model")


# ------------------------------------- the acceptance table: every command against bad files

TASK_ROW = {"prompt": "The king", "choices": [" is", " was"], "answer": 0}


def _corrupt_bundle(bundle: Path) -> Path:
    weights = bundle / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return weights


def _deep_config(bundle: Path) -> Path:
    (bundle / "config.json").write_text(DEEP)
    return bundle / "config.json"


def _huge_config(bundle: Path) -> Path:
    (bundle / "config.json").write_text(HUGE)
    return bundle / "config.json"


def _corrupt_index(bundle: Path) -> Path:
    damage_neighbourhoods(bundle / "index")
    return bundle / "index" / "neighbourhoods.safetensors"


def _deep_index(bundle: Path) -> Path:
    (bundle / "index" / "meta.json").write_text(DEEP)
    return bundle / "index" / "meta.json"


def _huge_index(bundle: Path) -> Path:
    (bundle / "index" / "meta.json").write_text(HUGE)
    return bundle / "index" / "meta.json"


def _deep_labels(bundle: Path) -> Path:
    (bundle / "index" / "labels.json").write_text(DEEP)
    return bundle / "index" / "labels.json"


BUNDLE_DAMAGE = {"corrupt bundle": _corrupt_bundle, "deep config": _deep_config, "huge config": _huge_config}
INDEX_DAMAGE = {
    "corrupt index": _corrupt_index,
    "deep index": _deep_index,
    "huge index": _huge_index,
    "deep labels": _deep_labels,
}
# Every command, and whether it reads the index (`index` rebuilds it, `generate` and `calibrate` never read it).
COMMANDS = {
    "generate": (["generate", *PROMPT], False),
    "attribute": (["attribute", "--prompt", "The king", "--completion", " is"], True),
    "report": (["report", "--prompts", "PROMPTS", "--out", "OUT.html"], True),
    "calibrate": (["calibrate", "--task", "TASK", "--out", "OUT.json", "--steps", "1"], False),
    "target": (["target", "--label", "a", "--out", "OUT.json"], True),
    "label": (["label"], True),
    "index": (["index", "--corpus", "CORPUS", *SMALL_INDEX], False),
}
TABLE = [(c, d) for c in COMMANDS for d in BUNDLE_DAMAGE] + [
    (c, d) for c, (_, reads_index) in COMMANDS.items() if reads_index for d in INDEX_DAMAGE
]


@pytest.mark.parametrize(("command", "damage"), TABLE, ids=[f"{c}-{d.replace(' ', '-')}" for c, d in TABLE])
def test_every_command_against_bad_files(command, damage, full, small_corpus, tmp_path, capsys):
    """Exit 1, one `prism: error:` line naming the bad file, no traceback, nothing changed."""
    bundle = bundle_copy(full, tmp_path / "b")
    bad = {**BUNDLE_DAMAGE, **INDEX_DAMAGE}[damage](bundle)
    (tmp_path / "prompts.txt").write_text("The king\n")
    write_jsonl(tmp_path / "task.jsonl", [TASK_ROW] * 6)
    out = tmp_path / ("previous.html" if command == "report" else "previous.json")
    out.write_text('{"previous": true}')
    names = {"PROMPTS": tmp_path / "prompts.txt", "TASK": tmp_path / "task.jsonl", "CORPUS": small_corpus}
    argv, _ = COMMANDS[command]
    argv = [names.get(a, out if a.startswith("OUT.") else a) for a in argv]
    before = snapshot_all(bundle, out)
    code, _, err = run([*argv, "--model", bundle], capsys)
    assert_one_line_error(code, err, str(bad))
    assert snapshot_all(bundle, out) == before
    assert no_leftovers(tmp_path) == []


# ------------------------------------------- interrupted at every replace step, nothing lost


def interrupt_at(monkeypatch, step: int | None) -> list[str]:
    """Make os.replace raise KeyboardInterrupt at call ``step`` (0-based; None: never); the
    destinations of the calls are recorded in the returned list."""
    real_replace = os.replace
    seen: list[str] = []

    def replace(src, dst):
        seen.append(str(dst))
        if step is not None and len(seen) == step + 1:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return seen


def _steps_of(argv: list, bundle: Path, tmp_path: Path, capsys, monkeypatch) -> list[str]:
    """The os.replace destinations of one uninterrupted run of ``argv`` on a copy of ``bundle``."""
    scratch = bundle_copy(bundle, tmp_path / "scratch" / "bundle")
    seen = interrupt_at(monkeypatch, None)
    code, _, err = run([a if a != bundle else scratch for a in argv], capsys)
    monkeypatch.undo()
    assert code == 0, err
    return seen


@pytest.mark.parametrize("command", ["index", "label"])
def test_index_and_label_interrupted_at_every_replace_step(command, full, small_corpus, tmp_path, capsys, monkeypatch):
    import core.store

    argv = ["index", "--corpus", small_corpus, *SMALL_INDEX] if command == "index" else ["label", "--quiet"]
    argv = [*argv, "--model", full]
    # Folders swapped by two renames (the fallback where one atomic exchange is unavailable), so
    # that the swap is interrupted too; test_index_swapped_in_one_exchange covers the exchange.
    monkeypatch.setattr(core.store, "_exchange", lambda a, b: False)
    steps = _steps_of(argv, full, tmp_path, capsys, monkeypatch)
    written = {Path(s).name for s in steps}
    expected = {"labels.json"}  # `label` reuses an atlas made with the same arguments for the same weights
    if command == "index":
        expected |= {"neighbourhoods.safetensors", "spans.safetensors", "atlas.json", "influence.safetensors"}
    assert expected <= written, written
    assert Path(steps[-1]).name == "index"  # the last step swaps the whole index in
    for step in range(len(steps)):
        bundle = bundle_copy(full, tmp_path / f"step{step}" / "bundle")
        before = snapshot(bundle)
        monkeypatch.setattr(core.store, "_exchange", lambda a, b: False)
        interrupt_at(monkeypatch, step)
        code, _, err = run([a if a != full else bundle for a in argv], capsys)
        monkeypatch.undo()
        assert code == 130, (step, steps[step], err)
        assert "--resume" not in err and "is as it was" in err
        assert snapshot(bundle) == before, (step, steps[step])
        assert no_leftovers(bundle.parent) == [], (step, steps[step])
        assert_index_loads(bundle)


def test_index_swapped_in_one_exchange(full, small_corpus, tmp_path, capsys, monkeypatch):
    """Where the system exchanges folders atomically, the swap is one step: interrupted before
    it, the old index is whole; after it, the new one."""
    import core.store

    bundle = bundle_copy(full, tmp_path / "b")
    before = snapshot(bundle)

    def interrupted(a, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(core.store, "_exchange", interrupted)
    argv = ["index", "--model", bundle, "--corpus", small_corpus, *SMALL_INDEX, "--top-m", "4", "--no-influence"]
    code, _, err = run(argv, capsys)
    assert code == 130 and snapshot(bundle) == before and no_leftovers(tmp_path) == []
    monkeypatch.undo()
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert json.loads(out)["path"] == str(bundle / "index")  # the bundle's, not the staging copy's
    assert json.loads((bundle / "index" / "meta.json").read_text())["arguments"]["top_m"] == 4
    assert_index_loads(bundle, influence=False)
    assert not (bundle / "index" / "influence.safetensors").exists()  # the old index went whole
    assert no_leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["report", "target", "calibrate"])
def test_report_and_controls_interrupted_keep_the_previous_file(command, full, tmp_path, capsys, monkeypatch):
    (tmp_path / "prompts.txt").write_text("The king\n")
    write_jsonl(tmp_path / "task.jsonl", [TASK_ROW] * 6)
    out = tmp_path / ("report.html" if command == "report" else "controls.json")
    argv = {
        "report": ["report", "--prompts", tmp_path / "prompts.txt", "--out", out, "--quiet"],
        "target": ["target", "--ids", "1,2", "--out", out],
        "calibrate": ["calibrate", "--task", tmp_path / "task.jsonl", "--out", out, "--steps", "1", "--quiet"],
    }[command]
    code, _, err = run([*argv, "--model", full], capsys)
    assert code == 0, err
    previous = out.read_bytes()
    steps = interrupt_at(monkeypatch, 0)
    code, _, err = run([*argv, "--model", full], capsys)
    monkeypatch.undo()
    assert code == 130 and [Path(s).name for s in steps] == [out.name], steps
    assert out.read_bytes() == previous
    assert no_leftovers(tmp_path) == []


# ------------------------------------------------------------------- the demo corpus, train --quiet


def test_demo_corpus_with_a_package_missing_fails_before_the_work(tmp_path, capsys, monkeypatch):
    import core.data.demo.build as demo_build
    import core.data.demo.fetch as fetch

    monkeypatch.setattr(fetch, "dpkg_version", lambda package: None if package == "fortunes-min" else "1.0")
    monkeypatch.setattr(fetch.shutil, "which", lambda tool: f"/usr/bin/{tool}")

    def too_late(*args, **kwargs):
        raise AssertionError("the build started before its prerequisites were checked")

    for reader in ("read_shakespeare_source", "read_wordnet_source", "read_debian_source", "read_pydoc_source"):
        monkeypatch.setattr(demo_build, reader, too_late)
    code, _, err = run(["corpus", "demo", "--out", tmp_path / "corpus"], capsys)
    assert_one_line_error(code, err, "Debian package(s) fortunes-min", "apt-get install -y fortunes-min")
    assert not (tmp_path / "corpus").exists()


def test_train_quiet_shows_no_progress_bar(small_corpus, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    argv = ["train", "--corpus", small_corpus, "--max-steps", "1"]
    bars = ("it/s]", "s/it]", "%|")
    hf_logging.enable_progress_bar()  # as in a fresh process (other tests' commands turn them off)
    code, _, err = run([*argv, "--out", tmp_path / "loud"], capsys)
    assert code == 0 and any(bar in err for bar in bars), err  # the bars this test is about exist
    hf_logging.enable_progress_bar()
    code, out, err = run([*argv, "--out", tmp_path / "quiet", "--quiet"], capsys)
    assert code == 0, err
    assert not any(bar in err for bar in bars), err
    assert "'loss'" not in out + err and "train_runtime" not in out + err  # no per-step log lines either
