"""The `prism` command: working paths and every bad-input case (one line, exit 1)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.cli import main
from core.control.controls import Controls, save_controls
from tests.helpers import REPO, assert_one_line_error, run


def test_missing_corpus(tmp_path, capsys):
    code, _, err = run(["train", "--corpus", tmp_path / "nope.jsonl", "--out", tmp_path / "m"], capsys)
    assert_one_line_error(code, err, "corpus not found", "nope.jsonl")


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    code, _, err = run(["train", "--corpus", tmp_path / "empty.jsonl", "--out", tmp_path / "m"], capsys)
    assert_one_line_error(code, err, "no usable documents")


def test_unknown_preset(tmp_path, capsys, small_corpus):
    code, _, err = run(["train", "--corpus", small_corpus, "--out", tmp_path / "m", "--preset", "huge"], capsys)
    assert_one_line_error(code, err, "huge")


def test_bad_max_steps(tmp_path, capsys, small_corpus):
    code, _, err = run(["train", "--corpus", small_corpus, "--out", tmp_path / "m", "--max-steps", "0"], capsys)
    assert_one_line_error(code, err, "positive integer")


def test_train_top_k_overrides_the_preset(tmp_path, capsys, small_corpus):
    code, _, err = run(
        ["train", "--corpus", small_corpus, "--out", tmp_path / "m", "--max-steps", "2", "--top-k", "4", "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["prototype_top_k"] == 4
    code, _, err = run(
        ["train", "--corpus", small_corpus, "--out", tmp_path / "big", "--max-steps", "2", "--top-k", "65", "--quiet"],
        capsys,
    )
    assert_one_line_error(code, err, "prototype_top_k", "65")


def test_resume_without_checkpoint(tmp_path, capsys, small_corpus):
    code, _, err = run(["train", "--corpus", small_corpus, "--out", tmp_path / "m", "--resume"], capsys)
    assert_one_line_error(code, err, "no complete checkpoint")


def test_model_dir_not_a_bundle(tmp_path, capsys):
    code, _, err = run(["generate", "--model", tmp_path, "--prompt", "hi"], capsys)
    assert_one_line_error(code, err, "not a PRISM bundle")
    code, _, err = run(["generate", "--model", tmp_path / "missing", "--prompt", "hi"], capsys)
    assert_one_line_error(code, err, "not found")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run(["generate", "--model", tmp_path, "--prompt", "hi"], capsys)
    assert_one_line_error(code, err, "model_type is 'llama'")


def test_missing_command_and_unknown_option(capsys):
    code, _, err = run([], capsys)
    assert_one_line_error(code, err)
    code, _, err = run(["generate", "--prompt", "x", "--bogus"], capsys)
    assert_one_line_error(code, err, "--bogus")


def test_generate_prints_text(tiny_bundle, capsys):
    code, out, err = run(["generate", "--model", tiny_bundle, "--prompt", "HAMLET.", "--max-new-tokens", "12"], capsys)
    assert code == 0, err
    assert out.startswith("HAMLET.")
    assert len(out.strip()) > len("HAMLET.")


def test_generate_truncates_long_prompt_with_notice(tiny_bundle, capsys):
    prompt = "word " * 400  # far beyond the tiny preset's 64-token context
    code, out, err = run(["generate", "--model", tiny_bundle, "--prompt", prompt, "--max-new-tokens", "8"], capsys)
    assert code == 0
    assert "prompt truncated" in err


def test_generate_with_controls_and_suppression(tiny_bundle, tmp_path, capsys):
    args = ["generate", "--model", tiny_bundle, "--prompt", "The king", "--max-new-tokens", "16"]
    code, plain, _ = run(args, capsys)
    assert code == 0
    save_controls(Controls(gains={i: 0.0 for i in range(0, 64, 2)}), tmp_path / "c.json")
    code, steered, err = run([*args, "--controls", tmp_path / "c.json"], capsys)
    assert code == 0, err
    assert steered != plain
    code, suppressed, err = run([*args, "--suppress", "0-40"], capsys)
    assert code == 0, err
    assert suppressed != plain


def test_bad_controls_and_suppress(tiny_bundle, tmp_path, capsys):
    base = ["generate", "--model", tiny_bundle, "--prompt", "The king"]
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = run([*base, "--controls", tmp_path / "bad.json"], capsys)
    assert_one_line_error(code, err, "not valid JSON")
    (tmp_path / "neg.json").write_text(json.dumps({"gains": {"3": -1}}))
    code, _, err = run([*base, "--controls", tmp_path / "neg.json"], capsys)
    assert_one_line_error(code, err, ">= 0")
    (tmp_path / "unknown.json").write_text(json.dumps({"suppressed": [100000]}))
    code, _, err = run([*base, "--controls", tmp_path / "unknown.json"], capsys)
    assert_one_line_error(code, err, "unknown prototype id 100000")
    (tmp_path / "other.json").write_text(json.dumps({"model_fingerprint": "0123456789abcdef", "gains": {"1": 2}}))
    code, _, err = run([*base, "--controls", tmp_path / "other.json"], capsys)
    assert_one_line_error(code, err, "made for model 0123456789abcdef")
    code, _, err = run([*base, "--suppress", "a-b"], capsys)
    assert_one_line_error(code, err, "cannot read prototype ids")
    code, _, err = run([*base, "--prompt", ""], capsys)
    assert_one_line_error(code, err, "empty")


def test_python_dash_m_core_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "core", "generate", "--model", str(tmp_path), "--prompt", "x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("prism: error:") and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["generate", "--help"], ["corpus", "demo", "--help"]]
)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
