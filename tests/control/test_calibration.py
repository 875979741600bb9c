"""Calibration: task files, exact cached scoring, a planted signal that calibration must find,
and the `prism calibrate` command."""

from __future__ import annotations

import json
import random

import pytest
import torch

from core.cli import main
from core.control.calibration import (
    _run,
    cached_scores,
    calibrate,
    evaluate_task,
    format_report,
    split_items,
)
from core.control.controls import Controls, load_controls
from core.control.formats import TaskItem, load_task
from core.errors import ArgumentError, TaskError
from tests.helpers import demo_rows, write_jsonl


def planted_items(n: int = 90, seed: int = 0) -> list[TaskItem]:
    """Prompts from every demo source; the answer is always the choice " Package:".

    The tiny model prefers it after package text and not after a play or a definition, so a
    controller that up-weights what promotes " Package:" (and down-weights what promotes the
    other choice) raises accuracy everywhere: a planted signal.
    """
    rng = random.Random(seed)
    rows = demo_rows(40, max_chars=300)
    rng.shuffle(rows)
    items = []
    for row in rows[:n]:
        choices = [" Package:", " ROMEO."]
        rng.shuffle(choices)
        items.append(TaskItem(prompt=row["text"][:160], choices=choices, answer=choices.index(" Package:")))
    return items


def test_load_task_names_the_bad_row(tmp_path):
    good = {"prompt": "p", "choices": ["a", "b"], "answer": 1}
    cases = [
        ("{not json", "line 2 is not valid JSON"),
        (json.dumps({"prompt": "p", "choices": ["a", "b"]}), 'line 2 has no "answer"'),
        (json.dumps({**good, "answer": 2}), 'line 2: "answer" must be an index 0..1'),
        (json.dumps({**good, "answer": True}), '"answer" must be an index'),
        (json.dumps({**good, "choices": "ab"}), '"choices" must be a list'),
        (json.dumps({**good, "prompt": ""}), '"prompt" must be a non-empty string'),
        ("[1, 2]", "line 2 is not a JSON object"),
    ]
    for bad, message in cases:
        path = tmp_path / "task.jsonl"
        path.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(TaskError, match=message):
            load_task(path)
    with pytest.raises(TaskError, match="not found"):
        load_task(tmp_path / "missing.jsonl")
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "id": "extra keys are fine"}) + "\n")
    assert load_task(path) == [TaskItem("p", ["a", "b"], 1)] * 2


def test_split_is_seeded_and_disjoint():
    items = planted_items(20)
    cal, held = split_items(items, 0.3, seed=3)
    assert len(held) == 6 and len(cal) == 14
    assert split_items(items, 0.3, seed=3) == (cal, held)
    with pytest.raises(TaskError, match="holdout"):
        split_items(items, 1.5, seed=0)


def test_cached_scores_match_real_forward_passes(loaded):
    items = planted_items(12)
    model = loaded.model
    plain, cache = _run(loaded, items, {}, 4096, None, want_cache=True)
    values, embedding = model.prototypes.values, model.unembedding
    ones = torch.ones(model.config.num_prototypes)
    assert torch.allclose(cached_scores(cache, ones, values, embedding), plain, atol=1e-4)
    gains = torch.rand(model.config.num_prototypes, generator=torch.Generator().manual_seed(0)) * 2
    controls = Controls(gains={j: float(g) for j, g in enumerate(gains)})
    real, _ = _run(loaded, items, {"prototype_gains": gains}, 4096, None, want_cache=False)
    assert torch.allclose(cached_scores(cache, gains, values, embedding), real, atol=1e-4)
    # Batching does not change scores.
    small_batches, _ = _run(loaded, items, {}, 64, None, want_cache=False)
    assert torch.allclose(small_batches, plain, atol=1e-5)
    assert 0 <= evaluate_task(loaded, items, controls) <= 1


def test_calibration_finds_a_planted_signal_without_touching_the_model(loaded):
    items = planted_items(90)
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    calls = []
    result = calibrate(
        loaded,
        items,
        holdout=0.3,
        steps=40,
        penalty=0.1,
        seed=0,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result.holdout_items == 27 and result.calibration_items == 63
    assert result.before < 0.9  # the tiny model does not already answer " Package:" everywhere
    assert result.after >= result.before + 0.1, (result.before, result.after)
    assert result.calibration_after > result.calibration_before
    assert result.after == evaluate_task(loaded, split_items(items, 0.3, 0)[1], result.controls)
    # A sparse, non-negative controller, made for this model, with the most moved first.
    gains = result.controls.gains
    assert 0 < result.changed == len(gains) < loaded.model.config.num_prototypes
    assert all(g >= 0 for g in gains.values())
    assert result.controls.model_fingerprint == loaded.fingerprint
    moves = [abs(m["gain"] - 1) for m in result.moved]
    assert moves == sorted(moves, reverse=True) and result.moved[0]["examples"] == []  # no index here
    assert calls[-1][0] == calls[-1][1] and len(calls) >= 40
    assert Controls.from_json(result.to_json()["controls"]).gains == gains
    assert "held-out accuracy" in format_report(result)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_stronger_penalty_changes_fewer_gains(loaded):
    items = planted_items(40)
    loose = calibrate(loaded, items, steps=15, penalty=0.0, seed=0)
    tight = calibrate(loaded, items, steps=15, penalty=0.5, seed=0, dev=0.25)
    assert tight.changed < loose.changed
    assert tight.settings["dev"] == 0.25 and tight.calibration_items == 28  # dev items count as calibration
    with pytest.raises(ArgumentError, match="dev must be a fraction"):
        calibrate(loaded, items, dev=1.0)


def test_cli_calibrate(tiny_bundle, tmp_path, capsys):
    task = write_jsonl(
        tmp_path / "task.jsonl",
        [{"prompt": i.prompt, "choices": i.choices, "answer": i.answer} for i in planted_items(30)],
    )
    out = tmp_path / "controls.json"
    code = main(
        ["calibrate", "--model", str(tiny_bundle), "--task", str(task), "--out", str(out), "--steps", "5", "--quiet"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "held-out accuracy" in captured.out and "gains changed" in captured.out
    assert load_controls(out).model_fingerprint
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "choices": ["a"], "answer": 0}\n')
    code = main(["calibrate", "--model", str(tiny_bundle), "--task", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("prism: error:") and "line 1" in err and len(err.strip().splitlines()) == 1
