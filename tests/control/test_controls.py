"""Controls documents applied per call, suppression targeting, and the demo task/behaviour
builders. (Model-level control invariants live in test_model.py; CLI errors for negative
gains, unknown ids and wrong fingerprints in test_cli.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from core.cli import main
from core.control.controls import Controls, ControlsError, control_kwargs, load_controls
from core.control.formats import load_behaviour
from core.control.targeting import (
    TargetingError,
    activation_profile,
    promotion,
    target_by_contrast,
    target_by_ids,
    target_by_label,
    target_by_query,
)
from core.data.demo.tasks import build_behaviours, build_tasks
from core.errors import BehaviourError
from core.generation import generate_text
from core.index.build import build_index
from core.index.format import load_index
from tests.helpers import REPO, demo_rows


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_bundle, small_corpus):
    """A copy of the tiny bundle with an index over its first 8k training tokens."""
    copy = tmp_path_factory.mktemp("indexed") / "tiny"
    shutil.copytree(tiny_bundle, copy)
    build_index(copy, small_corpus, max_tokens=8192, show_progress=False)
    return copy


def texts(source: str, n: int = 8, chars: int = 200) -> list[str]:
    return [r["text"][:chars] for r in demo_rows(20, max_chars=chars) if r["source"] == source][:n]


def test_controls_documents_alternated_equal_each_alone(loaded):
    model = loaded.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = Controls(gains={j: 0.5 + (j % 3) for j in range(0, model.config.num_prototypes, 3)})
    b = Controls(suppressed=list(range(0, model.config.num_prototypes - model.config.prototype_top_k, 5)))
    ids = torch.tensor([loaded.tokenizer("Package: python3-numpy\nSection:")["input_ids"]])
    outputs = {}
    for name, controls in [("a", a), ("b", b), ("a", a), ("b", b), ("none", None)]:
        logits = model(ids, **control_kwargs(controls, model, loaded.fingerprint, "cpu")).logits
        text = generate_text(loaded, "The king", max_new_tokens=12, controls=controls, seed=1).text
        if name in outputs:
            assert torch.equal(outputs[name][0], logits) and outputs[name][1] == text
        outputs[name] = (logits, text)
    assert not torch.equal(outputs["a"][0], outputs["none"][0])
    assert not torch.equal(outputs["b"][0], outputs["none"][0])
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_controls_document_validation():
    cases = [
        ({"gains": {"x": 1}}, "prototype id 'x' in gains is not an integer"),
        ({"gains": {"1": True}}, "gain of prototype 1 must be a number"),
        ({"gains": [1, 2]}, '"gains" must be an object'),
        ({"suppressed": [1, "2"]}, '"suppressed" must be a list of prototype ids'),
        ({"gain": {}}, "unknown keys in controls: \\['gain'\\]"),
        ([], "a controls document is a JSON object"),
    ]
    for data, message in cases:
        with pytest.raises(ControlsError, match=message):
            Controls.from_json(data)
    with pytest.raises(ControlsError, match="at most 4 prototypes can be suppressed"):
        Controls(suppressed=list(range(5))).validate(num_prototypes=8, top_k=4)
    with pytest.raises(ControlsError, match="must be a finite number >= 0, got inf"):
        Controls(gains={1: float("inf")}).validate(num_prototypes=8, top_k=4)


def test_contrast_targets_prototypes_of_the_behaviour(loaded):
    behaviour, neutral = texts("shakespeare"), texts("debian") + texts("pydoc")
    targets = target_by_contrast(loaded, behaviour, neutral, top=6, positions="all")
    assert 0 < len(targets) <= 6
    scores = [t.score for t in targets]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    assert "behaviour positions" in targets[0].evidence and targets[0].examples == []
    b_weight, b_active, _ = activation_profile(loaded, behaviour, "all")
    n_weight, _, _ = activation_profile(loaded, neutral, "all")
    assert b_weight[targets[0].id] - n_weight[targets[0].id] == pytest.approx(targets[0].score)
    assert b_active[targets[0].id] > 0
    # Once suppressed they are never active, and a second round finds other prototypes.
    controls = Controls(suppressed=[t.id for t in targets])
    after, after_active, _ = activation_profile(loaded, behaviour, "all", controls)
    assert after[[t.id for t in targets]].sum() == 0 and after_active[[t.id for t in targets]].sum() == 0
    second = target_by_contrast(loaded, behaviour, neutral, top=6, positions="all", controls=controls)
    assert not {t.id for t in second} & {t.id for t in targets}
    # With the behaviour's tokens, only prototypes whose values push those tokens qualify.
    words = [loaded.tokenizer(" the", add_special_tokens=False)["input_ids"][0]]
    writers = target_by_contrast(
        loaded, behaviour, neutral, top=6, positions="all", token_ids=words, background=texts("fortunes")
    )
    push = promotion(loaded, words)
    assert writers and all(push[t.id] > 0 for t in writers) and "background weight" in writers[0].evidence


def test_targeting_rejects_bad_requests(loaded):
    with pytest.raises(TargetingError, match="unknown prototype id 999"):
        target_by_ids([1, 999], num_prototypes=loaded.model.config.num_prototypes)
    with pytest.raises(TargetingError, match="top must be a positive integer"):
        target_by_contrast(loaded, ["a"], ["b"], top=0)
    with pytest.raises(TargetingError, match="at least one behaviour prompt"):
        target_by_contrast(loaded, [], ["b"])
    with pytest.raises(TargetingError, match="positions must be"):
        activation_profile(loaded, ["a"], "first")
    assert [t.id for t in target_by_ids([4, 2, 4])] == [4, 2]


def test_query_and_label_targeting_use_the_index(indexed):
    from core.bundle import load_bundle

    index = load_index(indexed)
    tokenizer = load_bundle(indexed).tokenizer
    for tok in (None, tokenizer):
        targets = target_by_query(index, "the", top=5, tokenizer=tok)
        assert 0 < len(targets) <= 5
        assert "neighbours have 'the'" in targets[0].evidence and targets[0].examples
        assert [t.score for t in targets] == sorted((t.score for t in targets), reverse=True)
    with pytest.raises(TargetingError, match="has no words"):
        target_by_query(index, "  ", top=5)
    index.labels = {}
    with pytest.raises(TargetingError, match="no labels yet"):
        target_by_label(index, "names")
    index.labels = {3: "names: ROMEO", 5: "numbers & dates: years", 7: "names: JULIET"}
    assert {t.id for t in target_by_label(index, "NAMES")} == {3, 7}
    assert "label 'numbers & dates: years'" in target_by_label(index, "year")[0].evidence
    assert target_by_ids([3], index)[0].examples


def test_demo_assets_are_reproducible(tmp_path):
    counts = build_tasks(REPO / "assets" / "corpus", tmp_path / "tasks")
    assert all(n >= 200 for n in counts.values()), counts
    for name in counts:
        built = (tmp_path / "tasks" / f"{name}.jsonl").read_bytes()
        assert built == (REPO / "assets" / "tasks" / f"{name}.jsonl").read_bytes()
    build_behaviours(REPO / "assets" / "corpus", tmp_path / "behaviours")
    for path in sorted((REPO / "assets" / "behaviours").glob("*.json")):
        assert (tmp_path / "behaviours" / path.name).read_bytes() == path.read_bytes()
        behaviour = load_behaviour(path)
        assert len(behaviour.prompts) >= 30 and behaviour.contrast_behaviour and behaviour.neutral_prompts
        assert not set(behaviour.prompts) & set(behaviour.contrast_behaviour)
    archaic = load_behaviour(REPO / "assets" / "behaviours" / "archaic.json")
    assert "thou" in archaic.words
    assert archaic.detect("and what art thou, sir?") and not archaic.detect("what are you, sir? Arthur")
    boiler = load_behaviour(REPO / "assets" / "behaviours" / "package_boilerplate.json")
    assert boiler.detect("This package contains the headers") and not boiler.detect("a package manager")


def test_load_behaviour_errors(tmp_path):
    with pytest.raises(BehaviourError, match="not found"):
        load_behaviour(tmp_path / "none.json")
    (tmp_path / "b.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(BehaviourError, match="lacks description"):
        load_behaviour(tmp_path / "b.json")


def test_cli_target(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "suppress.json"
    behaviour = {
        "name": "plays",
        "description": "d",
        "pattern": "thou",
        "source": "shakespeare",
        "prompts": ["KING.\nMy"],
        "neutral_prompts": ["Package: x"],
        "contrast_behaviour": texts("shakespeare", 4),
        "contrast_neutral": texts("debian", 4),
    }
    (tmp_path / "plays.json").write_text(json.dumps(behaviour))
    code = main(
        [
            "target",
            "--model",
            str(tiny_bundle),
            "--behaviour",
            str(tmp_path / "plays.json"),
            "--top",
            "3",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(load_controls(out).suppressed) == 3 and "behaviour positions" in captured.out
    code = main(["target", "--model", str(tiny_bundle), "--ids", "1,2", "--label", "x"])
    err = capsys.readouterr().err
    assert code == 1 and "exactly one of" in err and len(err.strip().splitlines()) == 1
