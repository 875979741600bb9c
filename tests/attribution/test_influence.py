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
    self_influence,
)
from core.attribution.influence import query as influence_module
from core.attribution.influence.sketch import CandidateSearch
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
    power = float(head.weight_power)  # a_j = softplus(s_j)^p
    corpus = load_corpus(corpus_path)
    packed = pack(corpus.train, bundle.tokenizer, 64).with_format("numpy")[:SEQUENCES]

    def loss_and_grad(hidden: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = head.keys.detach().clone().requires_grad_(True)
        values = head.values.detach().clone().requires_grad_(True)
        top, ids = (hidden @ keys.T).topk(k)
        z = (F.softplus(top).pow(power).unsqueeze(-1) * values[ids]).sum(0)
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


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_engine_matches_brute_force(small_bundle, short_corpus, tmp_path, monkeypatch, power):
    """Exact influence equals one dense solve over autograd gradients, also for a head whose
    weights are softplus(s)^p with p = 2 (--weight-power): its own gradients, not p = 1's."""
    bundle_dir = copy_bundle(small_bundle, tmp_path / "exact")
    if power != 1.0:
        config = json.loads((bundle_dir / "config.json").read_text())
        (bundle_dir / "config.json").write_text(json.dumps({**config, "weight_power": power}))
        assert float(load_bundle(bundle_dir).model.prototypes.weight_power) == power
        build_index(bundle_dir, short_corpus, max_tokens=64 * SEQUENCES, dtype="float64", show_progress=False)
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
        args = InfluenceArguments(**{**EXACT, "rank": 8, "curvature_tokens": 192}, batch_size=batch_size)
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
    assert stored[0].keys() == stored[1].keys() and "eigenvectors" in stored[0]
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


def test_older_formats_are_refused_with_the_rebuild_command(small_bundle, short_corpus, tmp_path):
    """Factors of formats 1 to 5 (per-prototype document lists, rank-r whitening; a store
    without document sketches; sketches of the unwhitened gradient; the complement weighted
    1/lambda) cannot be read: they are refused, naming the command that rebuilds them."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    bundle_dir = copy_bundle(small_bundle, tmp_path / "old")
    build_influence(bundle_dir, short_corpus, InfluenceArguments(**{**EXACT, "rank": 8}), show_progress=False)
    path = bundle_dir / "index" / "influence.safetensors"
    alone = bundle_dir / "index" / "self_influence.safetensors"
    alone_arrays = load_file(alone)
    with safe_open(str(alone), framework="numpy") as f:
        alone_meta = json.loads(f.metadata()["meta"])
    save_file(alone_arrays, alone, metadata={"meta": json.dumps({**alone_meta, "format_version": 0})})
    with pytest.raises(InfluenceError, match="has format 0, this version reads 1; rebuild.*prism index"):
        self_influence(bundle_dir)
    alone.unlink()  # builds of formats 1 to 5 wrote no self-influence file
    arrays = load_file(path)
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta["format_version"] == influence_module.FORMAT_VERSION == 6
    for version in (1, 2, 3, 4, 5):
        save_file(arrays, path, metadata={"meta": json.dumps({**meta, "format_version": version})})
        with pytest.raises(InfluenceError, match=f"has format {version}, this version reads 6; rebuild.*prism index"):
            load_influence(bundle_dir)
        with pytest.raises(InfluenceError, match="prism index"):
            self_influence(bundle_dir)


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
    corpus = Path(shutil.copy(short_corpus, tmp_path / short_corpus.name))  # same name and bytes: same corpus
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


def test_removed_pruning_options_are_refused():
    with pytest.raises(ArgumentError, match="top_documents=64: per-prototype document lists were removed"):
        InfluenceArguments(top_documents=64)
    assert InfluenceArguments(top_documents=None).top_documents is None  # what older callers pass
    args = InfluenceArguments()
    assert args.document_tokens is None and args.rank == 64 and args.storage == "int8"  # full coverage


# ---------------------------------------------------------------- the store and the inverse


def test_complement_preserving_inverse():
    """A_j = U diag(w) U^T + kappa I: the dense (G + lambda I)^-1 at full rank, and at low rank
    the truncated U (Sigma + lambda)^-1 U^T plus exactly the complement (I - U U^T) / (rho +
    lambda), rho the mean of the dropped eigenvalues; that complement is the exact inverse's
    average over the dropped directions, closer to it than 1/lambda (which overweights them)."""
    from core.attribution.influence import (
        apply_inverse_and_root,
        complement_weights,
        eigen_blocks,
        inverse_weights,
    )

    c, D = 3, 12
    X = torch.randn(c, D, 40, dtype=torch.float64)
    G = X @ X.transpose(1, 2) * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)[:, None, None]  # (c, D, D)
    lam = 0.1 * torch.diagonal(G, dim1=1, dim2=2).mean(-1)  # (c,)
    eye = torch.eye(D, dtype=torch.float64)
    ids = torch.arange(c).repeat_interleave(D)  # (c D,) each block applied to the identity's columns
    basis = eye.repeat(c, 1)  # (c D, D)

    trace = torch.diagonal(G, dim1=1, dim2=2).sum(-1)

    def materialise(U, sigma, kappa=None):
        kappa = complement_weights(trace, sigma, lam, D) if kappa is None else kappa
        A, _ = apply_inverse_and_root(basis, ids, U, inverse_weights(sigma, lam, kappa), kappa, chunk=5)  # A_j e_i
        return A.reshape(c, D, D)

    start = torch.randn(D, D, dtype=torch.float64)
    U, sigma = eigen_blocks(G, D, start)
    exact = torch.linalg.inv(G + lam[:, None, None] * eye)
    torch.testing.assert_close(materialise(U, sigma), exact, rtol=1e-8, atol=1e-8 * float(exact.abs().max()))

    r = 4
    U, sigma = eigen_blocks(G, r, start[:, : r + 8])
    torch.testing.assert_close(U.transpose(1, 2) @ U, eye[:r, :r].expand(c, r, r), rtol=0, atol=1e-12)
    truncated = U @ torch.diag_embed(1 / (sigma + lam[:, None])) @ U.transpose(1, 2)  # the old V V^T
    all_sigma = torch.linalg.eigvalsh(G).flip(-1)  # (c, D) largest first
    rho = all_sigma[:, r:].mean(-1)  # the mean dropped eigenvalue, from the full spectrum
    outside = eye - U @ U.transpose(1, 2)
    complement = outside / (rho + lam)[:, None, None]
    kept = materialise(U, sigma)
    torch.testing.assert_close(kept - truncated, complement, rtol=0, atol=1e-10 * float(complement.abs().max()))
    # 1/lambda on the complement (the previous form) is further from the exact inverse
    damped = materialise(U, sigma, 1 / lam)
    torch.testing.assert_close(damped - truncated, outside / lam[:, None, None], rtol=0, atol=1e-10 / float(lam.min()))
    for b in range(c):
        assert torch.linalg.norm(kept[b] - exact[b]) < torch.linalg.norm(damped[b] - exact[b])
    # the square root applied with the same gather: A^{1/2} A^{1/2} = A, symmetric
    kappa = complement_weights(trace, sigma, lam, D)
    _, root = apply_inverse_and_root(basis, ids, U, inverse_weights(sigma, lam, kappa), kappa, chunk=5)
    root = root.reshape(c, D, D)
    torch.testing.assert_close(root, root.transpose(1, 2), rtol=0, atol=1e-12 * float(root.abs().max()))
    torch.testing.assert_close(root @ root, kept, rtol=1e-9, atol=1e-9 * float(kept.abs().max()))


STORE_SEQUENCES = 16  # sequences stored by the explicit-gradient tests (no dense solve there)


def explicit_positions(bundle_dir: Path, corpus_path: Path) -> list[dict]:
    """Every attributable training position with its materialised (k, 2d) block gradients,
    found from the packed corpus independently of the store (float64)."""
    from core.attribution.influence import active_set, head_probabilities, prototype_gradients

    bundle = load_bundle(bundle_dir)
    model = bundle.model.double()
    head, E = model.prototypes, model.unembedding
    k = model.config.prototype_top_k
    packed = pack(load_corpus(corpus_path).train, bundle.tokenizer, 64).with_format("numpy")[:STORE_SEQUENCES]
    out = []
    for s in range(STORE_SEQUENCES):
        ids = torch.as_tensor(packed["input_ids"][s], dtype=torch.long)
        docs, chars = packed["doc_index"][s], packed["char_offset"][s]
        with torch.no_grad():
            hidden = model.model(input_ids=ids[None]).last_hidden_state[0]  # (T, d)
            active, weights = active_set(hidden, head.keys, k)
            probs = head_probabilities(active, weights, head.values, E)
            grads = prototype_gradients(
                hidden[:-1], active[:-1], weights[:-1], probs[:-1], ids[1:], head.keys, head.values, E
            )
        for t in range(63):
            if docs[t] >= 0:
                out.append({"doc": int(docs[t]), "ids": active[t], "grads": grads[t], "start": int(chars[t])})
    return out


def query_tensors(bundle_dir: Path):
    """(model, hidden, ids, weights, targets, probs, (n, k, 2d) gradients) of the completion."""
    from core.attribution.decompose import decompose_with_tensors
    from core.attribution.influence import head_probabilities, prototype_gradients

    bundle = load_bundle(bundle_dir)
    model = bundle.model.double()
    K, W, E = model.prototypes.keys, model.prototypes.values, model.unembedding
    t = decompose_with_tensors(bundle, None, PROMPT, COMPLETION, 1, None, 16)[1]
    probs = head_probabilities(t.ids, t.weights, W, E)  # float64
    grads = prototype_gradients(t.hidden, t.ids, t.weights, probs, t.targets, K, W, E)
    return model, t.hidden, t.ids, t.weights, t.targets, probs, grads


@pytest.fixture(scope="module")
def stored(small_bundle, short_corpus, tmp_path_factory):
    """Rank-8 factors in float64 over STORE_SEQUENCES sequences, in batches of 3 sequences
    (documents cross batches), with their explicit positions and the query's tensors."""
    bundle_dir = copy_bundle(small_bundle, tmp_path_factory.mktemp("store") / "b")
    args = {**EXACT, "rank": 8, "max_tokens": 64 * STORE_SEQUENCES, "batch_size": 3}
    build_influence(bundle_dir, short_corpus, InfluenceArguments(**args), show_progress=False)
    factors = load_influence(bundle_dir)
    U, w, kappa = factors.eigenvectors, factors.inverse_weights, factors.complement
    eye = torch.eye(U.shape[1], dtype=torch.float64)
    A = U @ torch.diag_embed(w) @ U.transpose(1, 2) + kappa[:, None, None] * eye  # (P, 2d, 2d) dense A_j
    return bundle_dir, factors, A, explicit_positions(bundle_dir, short_corpus), query_tensors(bundle_dir)


def test_store_reproduces_block_form_scores(stored):
    """sum_j g_qj^T A_j g_jD from explicitly materialised per-(document, prototype) gradients
    equals the bulk scan of the compact store, per token and for the span; so does each
    document's stored self-influence sum_j g_jD^T A_j g_jD / positions."""
    bundle_dir, factors, A, positions, (model, hidden, ids, weights, targets, probs, grads) = stored
    g_doc: dict[tuple[int, int], torch.Tensor] = {}  # (document, prototype) -> g_jD
    tokens: dict[int, int] = {}
    for p in positions:
        tokens[p["doc"]] = tokens.get(p["doc"], 0) + 1
        for j, g in zip(p["ids"].tolist(), p["grads"], strict=True):
            g_doc[p["doc"], j] = g_doc.get((p["doc"], j), 0) + g
    documents = factors.documents.tolist()
    assert documents == sorted(tokens) and len(documents) >= 5
    assert np.diff(factors.store.offsets).tolist() == [tokens[d] for d in documents]

    credits = factors.credit(model, hidden, ids, weights, targets, None, probs)
    span = influence_module.InfluenceCredit.concat(credits)
    expected_span = np.zeros(len(documents))
    for i in range(len(ids)):
        expected = np.zeros(len(documents))
        for j, g_q in zip(ids[i].tolist(), grads[i], strict=True):
            for n, doc in enumerate(documents):
                if (doc, j) in g_doc:
                    expected[n] += float(g_q @ A[j] @ g_doc[doc, j])
        scale = np.abs(expected).max()
        np.testing.assert_allclose(credits[i].scores, expected, rtol=1e-6, atol=1e-6 * scale)
        expected_span += expected
    np.testing.assert_allclose(span.scores, expected_span, rtol=1e-6, atol=1e-6 * np.abs(expected_span).max())
    assert (span.scores < 0).any() and (span.scores > 0).any()  # harmful documents are kept too

    quadratic = {doc: 0.0 for doc in documents}
    for (doc, j), g in g_doc.items():
        quadratic[doc] += float(g @ A[j] @ g)
    expected = np.array([quadratic[d] / tokens[d] for d in documents])
    np.testing.assert_allclose(factors.self_influence, expected, rtol=1e-6)
    norm = np.sqrt([quadratic[d] for d in documents])  # ||g_D||_A
    np.testing.assert_allclose(factors.gradient_norm, norm, rtol=1e-6)
    np.testing.assert_allclose(factors.relative(span.scores), expected_span / norm, rtol=1e-6)
    ranked = self_influence(bundle_dir)
    assert [r.doc_index for r in ranked] == [documents[i] for i in np.argsort(-expected, kind="stable")]
    assert ranked[0].positions == tokens[ranked[0].doc_index]


def test_block_sums_and_the_position_scan_give_the_same_scores(stored):
    """A store small enough keeps each document's block sums g_jD; scoring from them equals
    the scan of every stored position, for every document and for a subset."""
    from core.attribution.influence.store import document_scores, pair_lookup

    bundle_dir, factors, A, positions, (model, hidden, ids, weights, targets, probs, grads) = stored
    assert factors.blocks is not None and factors.meta["document_blocks"]
    credits = factors.credit(model, hidden, ids, weights, targets, None, probs)
    prototypes = torch.from_numpy(np.concatenate([c.prototypes for c in credits]))
    column = torch.arange(len(credits)).repeat_interleave(len(credits[0].prototypes))
    lookup = pair_lookup(prototypes, column, len(factors.complement), len(credits))
    psi = torch.cat([c.psi for c in credits])
    scan, scan_terms = document_scores(factors.store, psi, lookup, 1 << 12)
    blocks, shared = factors._scores(psi, lookup, None)
    np.testing.assert_allclose(blocks, scan, rtol=1e-9, atol=1e-9 * np.abs(scan).max())
    assert ((shared > 0) == (scan_terms > 0)).all()
    subset = np.array([3, 0, 2])
    np.testing.assert_allclose(factors._scores(psi, lookup, subset)[0], scan[subset], rtol=1e-9, atol=1e-12)
    # the positions of a subset read in many small chunks: the same sums and terms as one scan
    few = max(1, 3 * factors.store.k * len(credits))  # about 3 positions per chunk
    chunked, chunked_terms = document_scores(factors.store, psi, lookup, few, subset)
    np.testing.assert_allclose(chunked, scan[subset], rtol=1e-12, atol=1e-15)
    assert (chunked_terms == scan_terms[subset]).all() and chunked_terms.sum() > 0


def test_dense_and_gathered_inner_products_give_the_same_terms(stored):
    """pair_entries computes the positions' inner products with the query's pairs either as
    dense products read at the entries or pair by pair over the rows that hold each pair (for
    stores whose positions meet few of a query's pairs): the same entries and terms, in float64
    and from an int8 store, whichever way the cost rule picks."""
    from core.attribution.influence.store import PositionStore, pair_entries, pair_lookup, quantise

    bundle_dir, factors, A, positions, (model, hidden, ids, weights, targets, probs, grads) = stored
    credits = factors.credit(model, hidden, ids, weights, targets, None, probs)
    prototypes = torch.from_numpy(np.concatenate([c.prototypes for c in credits]))
    column = torch.arange(len(credits)).repeat_interleave(len(credits[0].prototypes))
    lookup = pair_lookup(prototypes, column, len(factors.complement), len(credits))
    psi = torch.cat([c.psi for c in credits])
    rows = factors.store.read(slice(0, len(factors.store)))
    # the same positions stored in int8, as the default build writes them
    arrays = {"active": factors.store.active, "documents": factors.store.documents}
    arrays.update(document_offsets=factors.store.offsets, char_start=factors.store.char_start)
    arrays["char_end"] = factors.store.char_end
    values = {"hidden": rows.h * rows.h_scale[:, None], "output_grad": rows.r * rows.r_scale[:, None]}
    values.update(score_grad=rows.c, weights=rows.a)
    for name, rows_of in values.items():
        arrays[name], arrays[f"{name}_scale"] = quantise(rows_of, "int8")
    int8 = PositionStore(arrays, torch.float64).read(slice(0, len(factors.store)))
    assert int8.h.dtype == torch.int8
    for stored_rows in (rows, int8):
        dense = pair_entries(stored_rows, psi, lookup, gather=False)
        gathered = pair_entries(stored_rows, psi, lookup, gather=True)
        chosen = pair_entries(stored_rows, psi, lookup)
        for a, b, c in zip(dense[:3], gathered[:3], chosen[:3], strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)
        assert len(dense[3]) > 0 and dense[3].abs().max() > 0
        torch.testing.assert_close(gathered[3], dense[3], rtol=1e-12, atol=1e-15 * float(dense[3].abs().max()))
        torch.testing.assert_close(chosen[3], dense[3], rtol=1e-12, atol=1e-15 * float(dense[3].abs().max()))
    # int8 rows: terms close to the float64 store's (quantisation), not equal
    error = (pair_entries(int8, psi, lookup)[3] - pair_entries(rows, psi, lookup)[3]).abs().max()
    assert 0 < error < 0.05 * float(pair_entries(rows, psi, lookup)[3].abs().max())


def test_a_sketch_only_store_scores_every_document_by_its_sketch(stored, short_corpus, tmp_path):
    """--influence-store sketch: the same factors and document sketches as the position store,
    no position arrays (a smaller file), and every document scored by <phi(q), phi(D)>: the
    estimate the retrieval tier searches, ranked the same way; no token is marked."""
    bundle_dir, factors, A, positions, (model, hidden, ids, weights, targets, probs, grads) = stored
    sketch_dir = copy_bundle(bundle_dir, tmp_path / "sketch")
    args = {**EXACT, "rank": 8, "max_tokens": 64 * STORE_SEQUENCES, "batch_size": 3, "store": "sketch"}
    build_influence(sketch_dir, short_corpus, InfluenceArguments(**args), show_progress=False)
    only = load_influence(sketch_dir)
    assert not only.exact and factors.exact and only.store is None
    assert only.stored_bytes() < factors.stored_bytes()
    np.testing.assert_array_equal(np.asarray(only._sketches), np.asarray(factors._sketches))
    np.testing.assert_array_equal(only.self_influence, factors.self_influence)
    credits = only.credit(model, hidden, ids, weights, targets, None, probs)
    span = influence_module.InfluenceCredit.concat(credits)
    estimate = factors.sketch_matrix().double().numpy() @ factors.query_sketches([span])[0].double().numpy()
    np.testing.assert_allclose(span.scores, estimate, rtol=1e-5, atol=1e-6 * np.abs(estimate).max())
    ranked = only.rank(span, top=3, ranking="loss")
    assert [r.doc_index for r in ranked] == [int(only.documents[d]) for d in np.argsort(-estimate, kind="stable")[:3]]
    # a ranking searches the sketches (int8 scan, float32 re-estimate of 4 x top): the same top
    # as sorting every document's estimate, in both directions and both rankings
    assert len(estimate) > CandidateSearch.PREFILTER  # top 1: the int8 scan's pool is not everything
    for ranking, key in (("loss", estimate), ("relative", estimate / only.gradient_norm)):
        for harmful in (False, True):
            sign = -1 if harmful else 1
            best = int(np.argsort(-sign * key, kind="stable")[0])
            ranked = only.rank(span, top=1, harmful=harmful, ranking=ranking)
            assert [r.doc_index for r in ranked] == [int(only.documents[best])] * int(not harmful or estimate[best] < 0)
    assert all(r.prototype == -1 and r.start == r.end == 0 and r.entries == 0 for r in ranked)  # unknown
    # the estimate follows the exact scores of the same documents
    exact = factors.exact_scores(span)[0]
    assert np.corrcoef(exact, estimate)[0, 1] > 0.5
    bundle = load_bundle(sketch_dir)
    bundle.model.double()
    result = attribute(bundle, load_index(sketch_dir), PROMPT, COMPLETION, method="influence", influence=only)
    assert result.measurement == "loss (estimated from gradient sketches)" and result.examples
    text = result.to_text()  # no empty [[ ]] marks and no "prototype -1" where nothing is known
    assert "[[]]" not in text and "prototype -1" not in text and result.examples[0].doc_id in text


def test_document_sketches_are_their_whitened_block_gradients_projected(stored):
    """Each stored document sketch is sum over its blocks of rho_j * (R A_j^{1/2} g_jD), with
    A_j^{1/2} the dense square root of the inverse curvature, computed here from materialised
    block gradients; the query's sketch is sum_j rho_j * (R A_j^{1/2} g_qj) from its explicit
    gradients; and with every document a candidate the retrieval tier ranks exactly as the full
    scan does."""
    from core.tensorfile import map_tensors

    bundle_dir, factors, A, positions, (model, hidden, ids, weights, targets, probs, grads) = stored
    arrays, _ = map_tensors(bundle_dir / "index" / "influence.safetensors")
    R = torch.from_numpy(np.array(arrays["sketch_projection"])).double()  # (m, 2d)
    rho = torch.from_numpy(np.array(arrays["sketch_signs"])).double()  # (P, m)
    values, vectors = torch.linalg.eigh(A)  # A_j symmetric positive definite
    root = vectors @ torch.diag_embed(values.sqrt()) @ vectors.transpose(1, 2)  # (P, 2d, 2d) A_j^{1/2}
    documents = factors.documents.tolist()
    expected = torch.zeros(len(documents), R.shape[0], dtype=torch.float64)
    for p in positions:
        whitened = torch.einsum("kde,ke->kd", root[p["ids"]], p["grads"])  # (k, 2d)
        expected[documents.index(p["doc"])] += (rho[p["ids"]] * (whitened @ R.T)).sum(0)
    stored_sketch = torch.from_numpy(np.array(arrays["document_sketch"])).double()
    np.testing.assert_allclose(stored_sketch, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    unwhitened = torch.zeros_like(expected)  # what format 4 stored: far from it
    for p in positions:
        unwhitened[documents.index(p["doc"])] += (rho[p["ids"]] * (p["grads"] @ R.T)).sum(0)
    assert not torch.allclose(stored_sketch / stored_sketch.norm(), unwhitened / unwhitened.norm(), atol=1e-2)

    span = influence_module.InfluenceCredit.concat(factors.credit(model, hidden, ids, weights, targets, None, probs))
    query = factors.query_sketches([span])[0]  # from the A^{1/2} g_q the credit keeps
    explicit = torch.zeros(R.shape[0], dtype=torch.float64)
    for i in range(len(ids)):
        for j, g_q in zip(ids[i].tolist(), grads[i], strict=True):
            explicit += rho[j] * (R @ (root[j] @ g_q))
    np.testing.assert_allclose(query, explicit, rtol=1e-6, atol=1e-8 * float(explicit.abs().max()))
    estimates = (stored_sketch @ query).numpy()
    # the relative ranking searches the sketches divided by the documents' gradient norms
    for ranking, estimate in (("loss", estimates), ("relative", estimates / factors.gradient_norm)):
        best = factors.candidates_for(span, 3, ranking=ranking)
        assert sorted(best.tolist()) == sorted(np.argsort(-estimate, kind="stable")[:3].tolist())
        for harmful in (False, True):
            full = factors.rank(span, top=5, harmful=harmful, candidates=0, ranking=ranking)
            every = factors.rank(span, top=5, harmful=harmful, candidates=len(documents), ranking=ranking)
            assert every == full


def test_retrieval_tier_scores_its_candidates_exactly(stored):
    """With fewer candidates than documents the ranking holds exact scores of the documents the
    sketch found, in exact order; here the sketch's 8 best hold 2 of the exact top 3 (measured
    on this fixed-seed store: it is a random projection, so the bound is what it finds, not 3)."""
    bundle_dir, factors, A, positions, (model, hidden, ids, weights, targets, probs, grads) = stored
    span = influence_module.InfluenceCredit.concat(factors.credit(model, hidden, ids, weights, targets, None, probs))
    exact = span.scores
    # scored beside its tokens, the span is their scores summed: the same scores, the same support
    tokens = factors.credit(model, hidden, ids, weights, targets, None, probs)
    together = influence_module.InfluenceCredit.concat(tokens)
    factors.score_every_document([*tokens, together])
    np.testing.assert_allclose(together.scores, exact, rtol=1e-9, atol=1e-12 * np.abs(exact).max())
    np.testing.assert_array_equal(together.terms > 0, span.terms > 0)
    assert (together.terms >= span.terms).all()  # a term counts once per token that holds it
    for ranking, key in (("loss", exact), ("relative", exact / factors.gradient_norm)):
        for harmful in (False, True):
            pool = factors.candidates_for(span, 8, harmful=harmful, ranking=ranking)
            ranked = factors.rank(span, top=3, harmful=harmful, candidates=8, ranking=ranking)
            sign = -1 if harmful else 1
            kept = [d for d in pool.tolist() if exact[d] < 0 or not harmful]  # harmful: negative scores only
            by_exact = sorted(kept, key=lambda d: (-sign * key[d], factors.documents[d]))[:3]
            assert [r.doc_index for r in ranked] == [int(factors.documents[d]) for d in by_exact]
            assert [r.score for r in ranked] == pytest.approx([exact[d] for d in by_exact], rel=1e-9)
            assert [r.relative for r in ranked] == pytest.approx(
                [key[d] for d in by_exact] if ranking == "relative" else [factors.relative(exact)[d] for d in by_exact],
                rel=1e-9,
            )
            top3 = set(np.argsort(-sign * key, kind="stable")[:3].tolist())
            assert len(top3 & set(pool.tolist())) >= 2, (ranking, harmful, sorted(top3), pool.tolist())


def test_batched_ranking_equals_each_request_alone(stored):
    """``rank_many`` (one sketch search, one read of the ranked documents' positions for every
    request, as ``attribute`` ranks the tokens, the span and its harmful documents) gives each
    request exactly what ``rank`` gives it alone: documents, scores, carriers and spans."""
    bundle_dir, factors, A, positions, (model, hidden, ids, weights, targets, probs, grads) = stored
    tokens = factors.credit(model, hidden, ids, weights, targets, None, probs)
    span = influence_module.InfluenceCredit.concat(tokens)
    requests = [*tokens, span, span]
    harmful = [False] * (len(tokens) + 1) + [True]
    for candidates in (0, 4):
        for ranking in ("relative", "loss"):
            batched = factors.rank_many(requests, harmful, 3, candidates, ranking)
            alone = [factors.rank(c, 3, h, candidates, ranking) for c, h in zip(requests, harmful, strict=True)]
            # the same documents, carriers and spans; the scores up to the order of the sums
            # (the batch reads every pool's documents once, in other chunks)
            key = [[(r.doc_index, r.prototype, r.start, r.end, r.entries) for r in rs] for rs in batched]
            assert key == [[(r.doc_index, r.prototype, r.start, r.end, r.entries) for r in rs] for rs in alone]
            for b, a in zip(batched, alone, strict=True):
                assert [r.score for r in b] == pytest.approx([r.score for r in a], rel=1e-12, abs=1e-15)
                assert [r.relative for r in b] == pytest.approx([r.relative for r in a], rel=1e-12, abs=1e-15)
            assert sum(map(len, batched)) > len(requests)  # not vacuous: most requests rank documents
            assert all(r.score < 0 for r in batched[-1])


def test_outliers_command_lists_documents_by_self_influence(stored, capsys):
    """`prism outliers` lists the stored documents by self-influence per token, highest first,
    with the corpus's ids, as text and as JSON."""
    from core.cli import main

    bundle_dir, factors, *_ = stored
    assert main(["outliers", "--model", str(bundle_dir), "--top", "3", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["documents"]
    order = np.lexsort((factors.documents, -factors.self_influence))[:3]
    assert [d["doc_index"] for d in listed] == [int(factors.documents[i]) for i in order]
    assert [d["self_influence_per_token"] for d in listed] == pytest.approx(factors.self_influence[order].tolist())
    train = factors.corpus().train
    assert [d["doc_id"] for d in listed] == [train[d["doc_index"]]["id"] for d in listed]
    assert main(["outliers", "--model", str(bundle_dir), "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"2 of {len(factors.documents)} training documents") and listed[0]["doc_id"] in text


def test_the_self_influence_file_alone_serves_outliers(stored, tmp_path, capsys):
    """Every build writes index/self_influence.safetensors (the documents' self-influence, far
    smaller than the factors); a bundle holding only it (as the demo ships) lists the same
    outliers, with the corpus found relative to the bundle, and has no influence method."""
    from core.attribution.influence import SELF_INFLUENCE_FILE, influence_exists, outliers, save_self_influence
    from core.cli import main

    bundle_dir, factors, *_ = stored
    alone = bundle_dir / "index" / SELF_INFLUENCE_FILE
    assert alone.is_file() and alone.stat().st_size < factors.stored_bytes() / 4
    expected = outliers(bundle_dir, top=None)
    assert expected["documents"] == len(factors.documents) == len(expected["all_scores"])
    assert [r["doc_index"] for r in expected["records"][:3]] == [
        int(factors.documents[i]) for i in np.lexsort((factors.documents, -factors.self_influence))[:3]
    ]
    copy = copy_bundle(bundle_dir, tmp_path / "elsewhere" / "copy")  # another depth: the corpus path is relative
    (copy / "index" / influence_module.INFLUENCE_FILE).unlink()
    (copy / "index" / SELF_INFLUENCE_FILE).unlink()
    save_self_influence(copy, source=bundle_dir / "index" / influence_module.INFLUENCE_FILE)
    assert not influence_exists(copy)
    found = outliers(copy, top=None)
    assert found["records"] == expected["records"] and list(found["all_sources"]) == list(expected["all_sources"])
    np.testing.assert_array_equal(found["all_scores"], factors.self_influence)
    assert main(["outliers", "--model", str(copy), "--top", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"2 of {len(factors.documents)} training documents")
    (copy / "index" / SELF_INFLUENCE_FILE).write_bytes(b"not safetensors")
    assert main(["outliers", "--model", str(copy)]) != 0  # a clear error, not a traceback
    assert "not readable" in capsys.readouterr().err


def test_attribution_lists_the_most_harmful_documents(stored):
    """attribute(method="influence") returns, beside the helpful examples, the documents with
    the most negative scores over the completion, lowest first, as the ranking computes them;
    the JSON and the text carry them."""
    bundle_dir, factors, A, positions, (model, hidden, ids, weights, targets, probs, grads) = stored
    span = influence_module.InfluenceCredit.concat(factors.credit(model, hidden, ids, weights, targets, None, probs))
    expected = factors.rank(span, top=3, harmful=True)
    bundle, index = load_bundle(bundle_dir), load_index(bundle_dir)
    result = attribute(bundle, index, PROMPT, COMPLETION, top=3, method="influence", influence=factors)
    assert [e.doc_index for e in result.harmful] == [r.doc_index for r in expected]
    scores, relative = [e.score for e in result.harmful], [e.relative for e in result.harmful]
    assert scores == pytest.approx([r.score for r in expected]) and max(scores) < 0
    assert relative == sorted(relative)  # ranked by the relative score, lowest first
    by_loss = attribute(bundle, index, PROMPT, COMPLETION, top=3, method="influence", influence=factors, ranking="loss")
    scores = [e.score for e in by_loss.harmful]
    assert scores == sorted(scores) and scores[0] == pytest.approx(min(span.scores), rel=1e-5)
    assert [e["doc_index"] for e in result.to_json()["harmful"]] == [r.doc_index for r in expected]
    assert "most harmful over the whole completion" in result.to_text()
    exemplars = attribute(bundle, index, PROMPT, COMPLETION, top=3, method="neighbourhood")
    assert exemplars.harmful == [] and exemplars.to_json()["harmful"] == []  # its scores are never negative


def test_highlight_is_the_token_that_carried_most_of_the_query(stored):
    """A ranked document's marked token is the position with the largest sum over its shared
    blocks of g_tj . A_j g_qj (this query's credit), its prototype the block with the largest
    summed credit; harmful documents come out lowest first."""
    bundle_dir, factors, A, positions, (model, hidden, ids, weights, targets, probs, grads) = stored
    span = influence_module.InfluenceCredit.concat(factors.credit(model, hidden, ids, weights, targets, None, probs))
    psi: dict[int, torch.Tensor] = {}
    for i in range(len(ids)):
        for j, g_q in zip(ids[i].tolist(), grads[i], strict=True):
            psi[j] = psi.get(j, 0) + A[j] @ g_q
    for harmful in (False, True):
        ranked = factors.rank(span, top=3, harmful=harmful)
        relative = [r.relative for r in ranked]
        assert relative == sorted(relative, reverse=not harmful)
        assert len(ranked) == (min(3, int((span.scores < 0).sum())) if harmful else 3)
        for r in ranked:
            sign = 1 if r.score >= 0 else -1
            mine = [p for p in positions if p["doc"] == r.doc_index]
            per_token, per_block = [], {}
            for p in mine:
                terms = {j: float(g @ psi[j]) for j, g in zip(p["ids"].tolist(), p["grads"], strict=True) if j in psi}
                per_token.append(sum(terms.values()))
                for j, v in terms.items():
                    per_block[j] = per_block.get(j, 0.0) + v
            assert sum(per_token) == pytest.approx(r.score, rel=1e-9)
            best = int(np.argmax(sign * np.array(per_token)))  # first of ties
            assert r.start == mine[best]["start"]
            assert r.prototype == min(per_block, key=lambda j: (-sign * per_block[j], j))
            assert r.entries == len(per_block)
    # Through the engine: the overall examples carry the same token.
    result = attribute(
        load_bundle(bundle_dir),
        load_index(bundle_dir),
        PROMPT,
        COMPLETION,
        top=3,
        method="influence",
        influence=factors,
    )
    assert [e.char_offset for e in result.examples] == [max(0, r.start) for r in factors.rank(span, top=3)]


def test_planted_canary_ranks_first_with_default_arguments(planted_bundle, planted_corpus, tmp_path):
    """With the defaults (every document, rank 64 plus the complement, int8 storage) the
    planted sentence ranks first, and int8 keeps the float32 ranking of every document."""
    from scipy.stats import spearmanr

    from tests.helpers import CANARY
    from tests.helpers import COMPLETION as CANARY_COMPLETION
    from tests.helpers import PROMPT as CANARY_PROMPT

    results = {}
    for storage in ("int8", "float32"):
        copy = copy_bundle(planted_bundle, tmp_path / storage)
        args = InfluenceArguments() if storage == "int8" else InfluenceArguments(storage=storage)
        summary = build_influence(copy, planted_corpus, args, show_progress=False)
        packed = np.asarray(pack(load_corpus(planted_corpus).train, load_bundle(copy).tokenizer, 64)["doc_index"])
        assert summary["documents"] == len(np.unique(packed[:, :-1][packed[:, :-1] >= 0]))  # every document stored
        results[storage] = attribute(
            load_bundle(copy), load_index(copy), CANARY_PROMPT, CANARY_COMPLETION, top=10**6, method="influence"
        )
    best = results["int8"].examples[0]
    assert best.doc_id.startswith("canary-"), [(e.doc_id, e.score) for e in results["int8"].examples[:10]]
    assert best.snippet == CANARY and best.snippet[best.highlight_start : best.highlight_end]
    int8, full = ({e.doc_id: e.score for e in results[s].examples} for s in ("int8", "float32"))
    assert int8.keys() == full.keys()
    assert spearmanr([int8[d] for d in full], list(full.values())).statistic >= 0.999
