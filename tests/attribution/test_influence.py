"""Prototype-block influence: equal to a brute-force computation of the same restricted
influence, independent of the batch size, refusing stale factors, and wired into the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.attribution.engine import attribute
from core.attribution.influence import (
    InfluenceArguments,
    InfluenceError,
    build_influence,
    load_influence,
    sampled_targets,
)
from core.attribution.influence import query as influence_module
from core.bundle import load_bundle, write_bundle
from core.data.corpus import load_corpus, pack
from core.errors import ArgumentError
from core.index.build import build_index
from core.index.format import load_index
from tests.helpers import demo_rows, run, write_jsonl

PROMPT, COMPLETION = "The quality of mercy", " is not strained"


SEQUENCES = 6  # training sequences of 64 tokens used by the exact tests


EXACT = dict(
    rank=None,
    top_documents=None,
    curvature_tokens=None,
    max_tokens=64 * SEQUENCES,
    dtype="float64",
    storage="float64",
    damping=0.1,
)


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory) -> Path:
    """40 short real documents (about 60 tokens each), so that a few sequences hold several."""
    return write_jsonl(tmp_path_factory.mktemp("short") / "short.jsonl", demo_rows(8, max_chars=240))


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory, tiny_bundle, short_corpus) -> Path:
    """A freshly initialised tiny PRISM model (24 prototypes, the tiny bundle's tokenizer),
    indexed on the first sequences of the small corpus: small enough for a dense solve."""
    from core.model.config import PrismConfig
    from core.model.modeling import PrismForCausalLM

    base = load_bundle(tiny_bundle)
    config = PrismConfig.from_dict({**base.model.config.to_dict(), "num_prototypes": 24})
    torch.manual_seed(0)
    model = PrismForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("influence") / "small"
    write_bundle(out, model, base.tokenizer, {"corpus_fingerprint": load_corpus(short_corpus).fingerprint})
    build_index(out, short_corpus, max_tokens=64 * SEQUENCES, dtype="float64", show_progress=False)
    return out


def copy_bundle(bundle: Path, dest: Path) -> Path:
    return Path(shutil.copytree(bundle, dest))


def scores_of(bundle_dir: Path, influence=None) -> dict[str, float]:
    bundle = load_bundle(bundle_dir)
    bundle.model.double()
    result = attribute(
        bundle, load_index(bundle_dir), PROMPT, COMPLETION, top=10**6, method="influence", influence=influence
    )
    return {e.doc_id: e.score for e in result.examples}


def brute_force_scores(bundle_dir: Path, corpus_path: Path, damping: float) -> dict[str, float]:
    """g_q^T (G_bd + Lambda)^-1 g_D with explicit per-token gradients from autograd and one
    dense solve over all prototype parameters (keys and values, P * 2d numbers)."""
    bundle = load_bundle(bundle_dir)
    model = bundle.model.double()
    head, E = model.prototypes, model.unembedding.detach()
    P, d = head.keys.shape
    k = model.config.prototype_top_k
    corpus = load_corpus(corpus_path)
    packed = pack(corpus.train, bundle.tokenizer, 64).with_format("numpy")[:SEQUENCES]

    def loss_and_grad(hidden: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = head.keys.detach().clone().requires_grad_(True)
        values = head.values.detach().clone().requires_grad_(True)
        top, ids = (hidden @ keys.T).topk(k)
        z = (F.softplus(top).unsqueeze(-1) * values[ids]).sum(0)
        logits = E @ z
        loss = F.cross_entropy(logits.unsqueeze(0), torch.tensor([target]))
        gk, gv = torch.autograd.grad(loss, (keys, values))
        return logits.detach().softmax(-1), torch.cat([gk, gv], dim=1).reshape(-1)  # theta_j = (K_j, W_j)

    fisher = torch.zeros(P * 2 * d, P * 2 * d, dtype=torch.float64)
    doc_grads: dict[int, torch.Tensor] = {}
    for s in range(SEQUENCES):
        ids = torch.as_tensor(packed["input_ids"][s], dtype=torch.long)
        docs = packed["doc_index"][s]
        with torch.no_grad():
            hidden = model.model(input_ids=ids[None]).last_hidden_state[0]  # (T, d)
        probs = []
        for t in range(63):
            if docs[t] < 0:
                continue
            p, g = loss_and_grad(hidden[t], int(ids[t + 1]))
            doc_grads[int(docs[t])] = doc_grads.get(int(docs[t]), 0) + g
            probs.append((t, p))
        full = torch.zeros(1, 64, E.shape[0], dtype=torch.float64)
        for t, p in probs:
            full[0, t] = p
        labels = sampled_targets(full, torch.tensor([s]), seed=0)[0]
        for t, _ in probs:
            _, g = loss_and_grad(hidden[t], int(labels[t]))
            fisher += torch.outer(g, g)
    block = torch.arange(P * 2 * d) // (2 * d)
    G = torch.where(block[:, None] == block[None, :], fisher, 0.0)  # keep the prototype blocks
    mean_eig = torch.diagonal(G).reshape(P, 2 * d).sum(1) / (2 * d)
    lam = damping * torch.where(mean_eig > 0, mean_eig, mean_eig[mean_eig > 0].mean())
    A = G + torch.diag(lam.repeat_interleave(2 * d))

    prompt_ids = bundle.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(prompt_ids + bundle.tokenizer(COMPLETION, add_special_tokens=False)["input_ids"])
    n_prompt = len(prompt_ids)  # prompt and completion are tokenised apart, as attribute() does
    with torch.no_grad():
        hidden = model.model(input_ids=ids[None, :-1]).last_hidden_state[0]
    g_query = sum(loss_and_grad(hidden[t], int(ids[t + 1]))[1] for t in range(n_prompt - 1, len(ids) - 1))
    docs = sorted(doc_grads)
    solved = torch.linalg.solve(A, torch.stack([doc_grads[doc] for doc in docs]).T)  # (P 2d, D)
    values = g_query @ solved
    names = corpus.train.select(docs)["id"]
    return dict(zip(names, values.tolist(), strict=True))


def test_engine_matches_brute_force(small_bundle, short_corpus, tmp_path, monkeypatch):
    bundle_dir = copy_bundle(small_bundle, tmp_path / "exact")
    summary = build_influence(bundle_dir, short_corpus, InfluenceArguments(**EXACT, batch_size=4), show_progress=False)
    assert summary["rank"] == 2 * 64 and summary["curvature_positions"] > 300
    engine = scores_of(bundle_dir)
    brute = brute_force_scores(bundle_dir, short_corpus, EXACT["damping"])
    assert len(engine) >= 3
    for doc_id in set(engine) | set(brute):  # a document the engine never meets has no shared block
        assert engine.get(doc_id, 0.0) == pytest.approx(
            brute.get(doc_id, 0.0), rel=1e-7, abs=1e-9 * max(abs(v) for v in brute.values())
        ), doc_id
    # A query worked through one token at a time (as one whose tokens reach more entries than a
    # run holds) gives the same scores.
    monkeypatch.setattr(influence_module, "CREDIT_CHUNK_ENTRIES", 1)
    assert scores_of(bundle_dir) == pytest.approx(engine, rel=1e-12, abs=0)


def test_scores_do_not_depend_on_batch_size(small_bundle, short_corpus, tmp_path):
    results = []
    for batch_size in (1, 4):
        bundle_dir = copy_bundle(small_bundle, tmp_path / f"b{batch_size}")
        args = InfluenceArguments(
            **{**EXACT, "rank": 8, "top_documents": 4, "curvature_tokens": 192}, batch_size=batch_size
        )
        build_influence(bundle_dir, short_corpus, args, show_progress=False)
        results.append(scores_of(bundle_dir))
    assert results[0].keys() == results[1].keys() and len(results[0]) >= 2
    assert results[0] == pytest.approx(results[1], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("rank", [None, 8])
def test_chunked_curvature_gives_the_same_factors(small_bundle, short_corpus, tmp_path, rank):
    """Blocks accumulated and inverted a few at a time (1 MiB: 8 of the 24 blocks per pass)
    give the same stored factors as all blocks at once, exact (Cholesky) and low rank."""
    from safetensors.numpy import load_file

    stored = []
    for memory_mb in (64, 1):
        bundle_dir = copy_bundle(small_bundle, tmp_path / f"m{memory_mb}")
        args = InfluenceArguments(**{**EXACT, "rank": rank, "curvature_memory_mb": memory_mb})
        build_influence(bundle_dir, short_corpus, args, show_progress=False)
        stored.append(load_file(bundle_dir / "index" / "influence.safetensors"))
    assert stored[0].keys() == stored[1].keys() and "whitening" in stored[0]
    for name in stored[0]:
        np.testing.assert_allclose(stored[1][name], stored[0][name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_float16_storage_keeps_the_ranking(small_bundle, short_corpus, tmp_path):
    exact_dir = copy_bundle(small_bundle, tmp_path / "f64")
    half_dir = copy_bundle(small_bundle, tmp_path / "f16")
    build_influence(exact_dir, short_corpus, InfluenceArguments(**EXACT), show_progress=False)
    build_influence(half_dir, short_corpus, InfluenceArguments(**{**EXACT, "storage": "float16"}), show_progress=False)
    exact, half = scores_of(exact_dir), scores_of(half_dir)
    scale = max(abs(v) for v in exact.values())
    assert exact.keys() == half.keys()
    assert max(abs(exact[d] - half[d]) for d in exact) < 1e-2 * scale


def test_format_1_factors_load_with_the_same_scores(small_bundle, short_corpus, tmp_path):
    """Factors written as (P, M) tables padded with -1 (format 1) give the same scores as the
    per-prototype entry lists of format 2."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    bundle_dir = copy_bundle(small_bundle, tmp_path / "v1")
    build_influence(bundle_dir, short_corpus, InfluenceArguments(**{**EXACT, "rank": 8}), show_progress=False)
    path = bundle_dir / "index" / "influence.safetensors"
    arrays = load_file(path)
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["meta"])
    per_entry = ("doc_index", "char_start", "char_end", "self_influence", "coefficients")
    # Drop the last entry of every other prototype, so that format 1 needs padding.
    offsets = arrays["offsets"]
    keep = np.ones(offsets[-1], dtype=bool)
    keep[offsets[1:][::2] - 1] = False
    counts = np.bincount(np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[keep], minlength=len(offsets) - 1)
    arrays = {**arrays, **{name: arrays[name][keep] for name in per_entry}}
    arrays["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    save_file(arrays, path, metadata={"meta": json.dumps(meta)})
    current = scores_of(bundle_dir)
    assert counts.min() < counts.max() and len(current) >= 2

    offsets = arrays.pop("offsets")
    P, M = len(counts), int(counts.max())
    proto = np.repeat(np.arange(P), counts)
    slot = np.arange(len(proto)) - offsets[proto]
    for name in per_entry:
        value = arrays[name]
        table = np.full((P, M, *value.shape[1:]), -1 if name == "doc_index" else 0, dtype=value.dtype)
        table[proto, slot] = value
        arrays[name] = table
    save_file(arrays, path, metadata={"meta": json.dumps({**meta, "format_version": 1})})
    assert scores_of(bundle_dir) == pytest.approx(current, rel=1e-12, abs=1e-15)


def test_factors_load_once_per_index(small_bundle, short_corpus, tmp_path, monkeypatch):
    """A report of several influence traces reads the factors (and the corpus) once, not per item."""
    import core.attribution.influence
    from core.report import build_report

    bundle_dir = copy_bundle(small_bundle, tmp_path / "once")
    build_influence(bundle_dir, short_corpus, InfluenceArguments(**{**EXACT, "rank": 8}), show_progress=False)
    loads = []
    real = core.attribution.influence.InfluenceFactors.__init__

    def counted(self, *args, **kwargs):
        loads.append(args[0])
        real(self, *args, **kwargs)

    monkeypatch.setattr(core.attribution.influence.InfluenceFactors, "__init__", counted)
    bundle, index = load_bundle(bundle_dir), load_index(bundle_dir)
    items = [{"prompt": PROMPT, "completion": COMPLETION}, {"prompt": "To be", "completion": " or not"}]
    report = build_report(bundle, index, items, method="influence")
    assert len(loads) == 1
    assert len(report["traces"]) == 2 and all(trace["examples"] for trace in report["traces"])


def test_stale_or_missing_factors_are_refused(small_bundle, short_corpus, tmp_path):
    bundle_dir = copy_bundle(small_bundle, tmp_path / "stale")
    with pytest.raises(InfluenceError, match="no influence factors.*prism index"):
        load_influence(bundle_dir)
    with pytest.raises(InfluenceError, match="no influence factors.*prism index"):
        scores_of(bundle_dir)
    other_corpus = write_jsonl(tmp_path / "other.jsonl", [{"id": "a", "text": "Other text. " * 200, "source": "x"}])
    with pytest.raises(InfluenceError, match="another corpus"):
        build_influence(bundle_dir, other_corpus, InfluenceArguments(**EXACT), show_progress=False)
    build_influence(bundle_dir, short_corpus, InfluenceArguments(**EXACT), show_progress=False)
    bundle = load_bundle(bundle_dir)
    bundle.model.prototypes.values.mul_(1.01)
    write_bundle(bundle_dir, bundle.model, bundle.tokenizer, bundle.training)
    with pytest.raises(InfluenceError, match="built for model .* not this model"):
        load_influence(bundle_dir)
    with pytest.raises(ArgumentError, match="damping must be > 0"):
        InfluenceArguments(damping=0)


def test_cli_builds_and_uses_influence(small_bundle, short_corpus, tmp_path, capsys):
    corpus = Path(shutil.copy(short_corpus, tmp_path / "corpus.jsonl"))
    bundle_dir = Path(shutil.copytree(small_bundle, tmp_path / "cli", ignore=shutil.ignore_patterns("index")))
    code, out, err = run(
        [
            "index",
            "--model",
            bundle_dir,
            "--corpus",
            corpus,
            "--max-tokens",
            64 * SEQUENCES,
            "--curvature-tokens",
            128,
            "--influence-rank",
            8,
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["influence"]["rank"] == 8 and summary["influence"]["influence_bytes"] > 0
    args = [
        "attribute",
        "--model",
        bundle_dir,
        "--prompt",
        PROMPT,
        "--completion",
        COMPLETION,
        "--method",
        "influence",
        "--json",
    ]
    code, out, err = run(args, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "influence" and result["examples"]
    for token in result["tokens"]:
        slices = np.array([p["slice"] for p in token["prototypes"]])
        assert abs(slices.sum() - token["logit"]) / np.abs(slices).sum() < 1e-4
    for example in result["examples"]:
        assert {"doc_id", "source", "score", "snippet", "prototype"} <= set(example)
        assert example["snippet"][example["highlight_start"] : example["highlight_end"]]
    corpus.rename(tmp_path / "moved.jsonl")
    code, _, err = run(args, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "no longer at" in lines[0] and "prism index" in lines[0], err
    code, _, err = run(["attribute", "--model", bundle_dir, "--prompt", PROMPT, "--completion", "\udcff\udcfe"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "not valid text" in lines[0], err
