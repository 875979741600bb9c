"""Device and dtype: every model-running command with ``--device cpu --dtype bfloat16`` on a tiny
model, float32 slices that sum to the logit in every dtype, defaults from the environment, and
the CUDA checks (marked ``gpu``, skipped without a CUDA device)."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from core.attribution.decompose import decompose
from core.bundle import load_bundle
from tests.helpers import assert_one_line_error, run, write_jsonl

# The tolerances docs/model.md and the README state:
# |sum of slices - logit| <= SLICE_TOL * sum of |slices|, in every dtype (both are float32);
SLICE_TOL = 1e-4
# |logit in dtype - logit in float32| <= DTYPE_TOL[dtype] * (1 + |logit in float32|).
DTYPE_TOL = {"float32": 1e-5, "bfloat16": 0.05, "float16": 0.005}
FLAGS = ["--device", "cpu", "--dtype", "bfloat16"]
PROMPT, COMPLETION = "The king said to his", " daughter that the sea was cold"


def assert_slices_sum_to_logits(tokens: list[dict]) -> None:
    """Each token's slices (and each alternative's) sum to its reported logit."""
    assert tokens
    for token in tokens:
        pairs = [([p["slice"] for p in token["prototypes"]], token["logit"])]
        pairs += [(a["slices"], a["logit"]) for a in token.get("alternatives", [])]
        for slices, logit in pairs:
            slices = np.asarray(slices, dtype=np.float64)
            assert abs(slices.sum() - logit) <= SLICE_TOL * np.abs(slices).sum(), (slices.sum(), logit)


def test_every_model_command_runs_in_bfloat16_on_the_cpu(tmp_path, small_corpus, capsys):
    bundle = tmp_path / "bf16"
    code, _, err = run(
        ["train", "--corpus", small_corpus, "--out", bundle, "--preset", "tiny", "--max-steps", 8, "--quiet", *FLAGS],
        capsys,
    )
    assert code == 0, err
    record = json.loads((bundle / "training.json").read_text())
    assert (record["device"], record["dtype"]) == ("cpu", "bfloat16")  # autocast; the weights stay float32

    code, out, err = run(
        ["index", "--model", bundle, "--corpus", small_corpus, "--max-tokens", 8192, "--no-influence", "--no-spans"]
        + ["--quiet", *FLAGS],
        capsys,
    )
    assert code == 0, err
    assert json.loads(out)["labels"]["atlas_points"] == 64
    code, _, err = run(["label", "--model", bundle, "--quiet", *FLAGS], capsys)
    assert code == 0, err

    common = ["--model", bundle, *FLAGS]
    code, out, err = run(["attribute", *common, "--prompt", PROMPT, "--completion", COMPLETION, "--json"], capsys)
    assert code == 0, err
    assert_slices_sum_to_logits(json.loads(out)["tokens"])

    code, out, err = run(["generate", *common, "--prompt", PROMPT, "--max-new-tokens", 6], capsys)
    assert code == 0, err
    assert out.startswith(PROMPT)

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPT, "completion": COMPLETION}])
    code, _, err = run(["report", *common, "--prompts", prompts, "--out", tmp_path / "r.json", "--quiet"], capsys)
    assert code == 0, err
    (trace,) = json.loads((tmp_path / "r.json").read_text())["traces"]
    assert_slices_sum_to_logits(trace["tokens"])

    items = [{"prompt": f"word {i}", "choices": [" a", " b"], "answer": i % 2} for i in range(12)]
    task = write_jsonl(tmp_path / "task.jsonl", items)
    code, out, err = run(
        ["calibrate", *common, "--task", task, "--out", tmp_path / "c.json", "--steps", 3, "--json", "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "c.json").read_text())["model_fingerprint"]

    code, out, err = run(["target", *common, "--query", "the", "--top", 3, "--out", tmp_path / "t.json"], capsys)
    assert code == 0, err
    assert len(json.loads((tmp_path / "t.json").read_text())["suppressed"]) == 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_slices_are_float32_and_logits_stay_near_float32(loaded, tiny_bundle, dtype):
    low = load_bundle(tiny_bundle, dtype=dtype)
    assert low.dtype == dtype and low.model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    assert low.model.prototypes.keys.dtype == torch.float32  # the head is kept in float32
    reference = decompose(loaded, prompt=PROMPT, completion=COMPLETION)
    reduced = decompose(low, prompt=PROMPT, completion=COMPLETION)
    assert_slices_sum_to_logits([asdict(t) for t in reduced.tokens])
    for a, b in zip(reference.tokens, reduced.tokens, strict=True):
        assert isinstance(b.logit, float) and all(isinstance(p.slice, float) for p in b.prototypes)
        assert abs(b.logit - a.logit) <= DTYPE_TOL[dtype] * (1 + abs(a.logit)), (dtype, a.logit, b.logit)
    # The forward pass itself: its slices are float32 and sum to its own (reduced) logits up to
    # the logits' rounding to the dtype (8 bits of mantissa for bfloat16, 11 for float16).
    ids = torch.tensor([low.tokenizer(PROMPT + COMPLETION)["input_ids"]])
    out = low.model(ids, return_prototypes=True)
    assert out.prototype_slices.dtype == torch.float32 and out.logits.dtype == getattr(torch, dtype)
    chosen = out.logits.float().gather(-1, out.logits.argmax(-1, keepdim=True))[..., 0]  # (1, T)
    eps = torch.finfo(getattr(torch, dtype)).eps
    scale = out.prototype_slices[..., 0, :].abs().sum(-1)  # (1, T)
    assert ((out.prototype_slices[..., 0, :].sum(-1) - chosen).abs() <= 4 * eps * (1 + scale)).all()


def test_device_and_dtype_defaults_come_from_the_environment(tiny_bundle, monkeypatch, capsys):
    monkeypatch.setenv("PRISM_DTYPE", "float16")
    code, out, err = run(["generate", "--model", tiny_bundle, "--prompt", PROMPT, "--max-new-tokens", 3], capsys)
    assert code == 0, err
    monkeypatch.setenv("PRISM_DTYPE", "half")
    code, _, err = run(["generate", "--model", tiny_bundle, "--prompt", PROMPT], capsys)
    assert_one_line_error(code, err, "$PRISM_DTYPE is 'half'", "float16")
    monkeypatch.delenv("PRISM_DTYPE")
    code, _, err = run(["generate", "--model", tiny_bundle, "--prompt", PROMPT, "--dtype", "int8"], capsys)
    assert_one_line_error(code, err, "--dtype", "int8")
    if not torch.cuda.is_available():
        code, _, err = run(["generate", "--model", tiny_bundle, "--prompt", PROMPT, "--device", "cuda"], capsys)
        assert_one_line_error(code, err, "no CUDA device", "--device cpu")
        code, _, err = run(["train", "--corpus", "c", "--out", "o", "--dtype", "float16"], capsys)
        assert_one_line_error(code, err, "float16", "CUDA only")


@pytest.mark.gpu
def test_cuda_bundle_attributes_and_generates_with_controls(planted_bundle):
    from core import Controls, attribute, generate_text, load_index

    bundle = load_bundle(planted_bundle, device="cuda", dtype="bfloat16")
    assert bundle.device.type == "cuda" and bundle.dtype == "bfloat16"
    controls = Controls(gains={3: 2.0}, suppressed=[5])
    result = generate_text(bundle, PROMPT, max_new_tokens=4, controls=controls)
    assert result.new_ids
    index = load_index(planted_bundle)
    traced = attribute(bundle, index, PROMPT, COMPLETION, method="neighbourhood", controls=controls)
    assert_slices_sum_to_logits([asdict(t) for t in traced.decomposition.tokens])
    assert traced.examples


def test_explorer_loads_on_the_configured_device_and_dtype_and_says_so(monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from tests.helpers import APP

    monkeypatch.setenv("PRISM_EXPLORER_THREADS", "0")
    monkeypatch.setenv("PRISM_DTYPE", "bfloat16")
    at = AppTest.from_file(APP, default_timeout=180).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Runs on cpu in bfloat16" in c.value for c in at.sidebar.caption), [c.value for c in at.sidebar.caption]
    if not torch.cuda.is_available():
        monkeypatch.setenv("PRISM_DEVICE", "cuda")
        at = AppTest.from_file(APP, default_timeout=180).run()
        assert any("no CUDA device" in e.value for e in at.error), [e.value for e in at.error]
