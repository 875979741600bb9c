"""transformers interop and the bundle's files: trust_remote_code loading in a process that never
imports core, refusal of a non-PRISM config, one normal-sized shard, the weight digest remembered
instead of rehashed, and a `prism` whose core lies outside a source checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig

import core.store
from core import GREEDY, PrismConfig, PrismForCausalLM, generate_text, load_bundle
from core.bundle import AUTO_MAP, CODE_FILES, add_remote_code, definition_hashes, model_fingerprint
from core.errors import ArgumentError, BundleError
from tests.helpers import REPO

DEMO = REPO / "assets" / "models" / "demo"
PROMPT = "The king"

# Run in a fresh interpreter where `import core` fails: only the bundle's own code can serve.
REMOTE = """
import json, sys
sys.modules["core"] = None  # any `import core` now raises ImportError
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for path in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    ids = tok(sys.argv[1], return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    out[path] = {"module": type(model).__module__, "text": tok.decode(new)}
out["core_loaded"] = [m for m, v in sys.modules.items() if m.split(".")[0] == "core" and v is not None]
print(json.dumps(out))
"""


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRISM_")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")  # the copied code goes here, not ~/.cache
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_bundles_load_with_trust_remote_code_without_core(tiny_bundle, tmp_path):
    for name in CODE_FILES:
        assert (tiny_bundle / name).is_file(), name
    assert json.loads((tiny_bundle / "config.json").read_text())["auto_map"] == AUTO_MAP
    paths = [str(DEMO), str(tiny_bundle)]
    done = subprocess.run(
        [sys.executable, "-c", REMOTE, PROMPT, *paths],
        cwd=tmp_path,
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["core_loaded"] == []
    for path in paths:
        assert result[path]["module"].startswith("transformers_modules."), result[path]
        expected = generate_text(load_bundle(path), PROMPT, max_new_tokens=8, settings=GREEDY)  # the same decoding
        assert result[path]["text"] == expected.text, path


def test_a_non_prism_config_is_refused_in_one_line(tmp_path):
    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100
    ).save_pretrained(tmp_path)
    for load in (PrismConfig.from_pretrained, PrismForCausalLM.from_pretrained):
        with pytest.raises(ArgumentError, match=r"holds a 'llama' config, not a PRISM one") as caught:
            load(tmp_path)
        assert "\n" not in str(caught.value)


def test_one_normal_shard_and_the_weights_hashed_once(tiny_bundle, tmp_path, monkeypatch):
    assert [p.name for p in tiny_bundle.glob("*.safetensors")] == ["model.safetensors"]
    monkeypatch.setenv("PRISM_CACHE_DIR", str(tmp_path / "cache"))
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "b", ignore=shutil.ignore_patterns("index")))
    hashed = []
    real = core.store.sha256_file
    monkeypatch.setattr(core.store, "sha256_file", lambda p, *a, **k: hashed.append(Path(p).name) or real(p, *a, **k))
    first = model_fingerprint(copy)
    assert first == json.loads((copy / "training.json").read_text())["model_fingerprint"]
    assert hashed.count("model.safetensors") == 1  # a new copy: hashed once...
    load_bundle(copy)
    model_fingerprint(copy)
    assert hashed.count("model.safetensors") == 1  # ...then remembered, in this process
    core.bundle._digests.clear()
    assert model_fingerprint(copy) == first and hashed.count("model.safetensors") == 1  # and in the cache file
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != first and hashed.count("model.safetensors") == 2
    # write_bundle records the digest of what it writes: loading a new bundle hashes nothing.
    from core.bundle import write_bundle

    bundle = load_bundle(tiny_bundle)
    hashed.clear()
    write_bundle(tmp_path / "new", bundle.model, bundle.tokenizer, {"kind": "prism"})
    saved = hashed.count("model.safetensors")
    core.bundle._digests.clear()
    load_bundle(tmp_path / "new")
    assert hashed.count("model.safetensors") == saved == 1


def test_a_shard_size_splits_the_weights_and_they_load_equal(tiny_bundle, tmp_path):
    """--max-shard-size: a repository with a file-size limit gets several smaller weight files."""
    from core.bundle import write_bundle

    bundle = load_bundle(tiny_bundle)
    write_bundle(tmp_path / "sharded", bundle.model, bundle.tokenizer, {"kind": "prism"}, max_shard_size="200KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for shard in shards:  # a shard over the size holds one tensor larger than the size by itself
        with safe_open(shard, "pt") as f:
            assert shard.stat().st_size <= 200_000 or len(list(f.keys())) == 1, shard.name
    reloaded = load_bundle(tmp_path / "sharded").model.state_dict()
    for name, tensor in bundle.model.state_dict().items():
        assert torch.equal(reloaded[name], tensor), name


def test_add_remote_code_keeps_weights_and_fingerprint(tiny_bundle, tmp_path):
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "old", ignore=shutil.ignore_patterns("index")))
    config = json.loads((copy / "config.json").read_text())
    del config["auto_map"]
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    for name in CODE_FILES:
        (copy / name).unlink()
    training = json.loads((copy / "training.json").read_text())
    training["definition_sha256"] = definition_hashes(copy)  # as a bundle written before auto_map records it
    (copy / "training.json").write_text(json.dumps(training))
    weights = (copy / "model.safetensors").read_bytes()
    fingerprint = model_fingerprint(copy)
    assert sorted(add_remote_code(copy)) == sorted([*CODE_FILES, "config.json", "training.json"])
    assert (copy / "model.safetensors").read_bytes() == weights
    assert model_fingerprint(copy) == fingerprint
    assert json.loads((copy / "config.json").read_text())["auto_map"] == AUTO_MAP
    (copy / "tokenizer_config.json").write_text("{}")  # an edited definition file is not vouched for
    with pytest.raises(BundleError, match="edited since the bundle was written"):
        add_remote_code(copy)


# Three commands in one interpreter (each start imports torch and transformers): their exit
# codes and stderr, then --help's text.
OUTSIDE = """
import contextlib, io, json, sys
from core.cli import main
codes, errors = [], []
for argv in (["generate", "--prompt", "hi"], ["explore"]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        codes.append(main(argv))
    errors.append(err.getvalue())
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    main(["--help"])
print(json.dumps({"codes": codes, "errors": errors, "help": out.getvalue()}))
"""


def test_prism_outside_a_source_checkout_names_model_and_explore_explains(tiny_bundle, tmp_path):
    site = tmp_path / "site-packages"  # core as a non-editable install lays it out: no assets/, no explorer/
    shutil.copytree(REPO / "core", site / "core", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**_clean_env(tmp_path), "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", OUTSIDE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["codes"] == [1, 1]
    model_error, explore_error = result["errors"]
    assert model_error.count("\n") == 1 and model_error.startswith("prism: error: no model given: pass --model")
    assert "site-packages" not in model_error
    assert explore_error.startswith("prism: error: the explorer app is not part of the installed package")
    assert "explore" in result["help"]
    prism = [sys.executable, "-c", "import sys; from core.cli import main; sys.exit(main())"]
    done = subprocess.run(
        [*prism, "generate", "--prompt", "hi", "--max-new-tokens", "3"],
        cwd=tmp_path,
        env={**env, "PRISM_MODEL": str(tiny_bundle)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.startswith("hi"), done.stderr[-2000:]
