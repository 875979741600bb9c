"""Post-hoc baselines: the Kronfluence (EK-FAC), dattri (LoGra) and bm25s adapters run and find
a training example that the query repeats, on a tiny dense model and on a PRISM model's linear
copy; the linear copy gives the model's logits and gradients; whole documents are windowed and
summed back. The library tests are skipped with the reason when the bench extras
(requirements-bench.txt) are not installed."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch

from core.attribution.baselines import (
    BaselineError,
    bm25_scores,
    document_windows,
    ekfac_scores,
    linear_head_copy,
    logra_scores,
    query_examples,
    sum_windows,
    training_examples,
)


def needs(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{module} is a bench extra: pip install -r requirements-bench.txt",
    )


@pytest.fixture(scope="module")
def tiny_dense():
    """A freshly initialised tiny dense twin (2 layers, d = 64, vocab 512), 12 training
    examples of 16 tokens and two queries that repeat examples 3 and 7."""
    from core.model.config import PrismConfig
    from core.model.modeling import PrismForCausalLM
    from core.train.trainer import PRESETS, build_config

    config = build_config(PRESETS["tiny"], vocab_size=512, eos_id=0, dense=True)
    assert isinstance(config, PrismConfig) and config.dense
    torch.manual_seed(0)
    model = PrismForCausalLM(config).eval()
    rows = torch.randint(1, 512, (12, 16), generator=torch.Generator().manual_seed(0)).tolist()
    queries = query_examples([rows[3][:6], rows[7][:4]], [rows[3][6:], rows[7][4:]], pad_id=0)
    return model, training_examples(rows), queries


def check(result, model_before: dict, model) -> None:
    assert result.scores.shape == (2, 12) and np.isfinite(result.scores).all()
    assert result.scores.argmax(axis=1).tolist() == [3, 7]  # + = helpful: the repeated example first
    assert result.fit_seconds > 0 and result.score_seconds > 0
    for name, value in model.state_dict().items():  # the adapters work on a copy
        assert torch.equal(value, model_before[name])


@needs("kronfluence")
def test_kronfluence_ekfac_adapter(tiny_dense):
    model, train, queries = tiny_dense
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check(ekfac_scores(model, train, queries, train_batch_size=4), before, model)


@needs("dattri")
def test_dattri_logra_adapter(tiny_dense):
    model, train, queries = tiny_dense
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = logra_scores(model, train, queries, proj_dim=16)
    check(result, before, model)
    assert result.bytes_per_example == 4 * 16 * 14  # 16 floats for each of 14 linear layers
    with pytest.raises(BaselineError, match="perfect square"):
        logra_scores(model, train, queries, proj_dim=10)


def test_examples_validate_their_shapes():
    with pytest.raises(BaselineError, match="one length"):
        training_examples([[1, 2, 3], [1, 2]])
    q = query_examples([[5, 6]], [[7, 8, 9]], pad_id=0)
    assert q.labels.tolist() == [[-100, -100, 7, 8, 9]]


def test_linear_head_copy_gives_the_models_logits(loaded, tiny_dense):
    """The tiny test bundle (PRISM) and a dense twin: the nn.Linear head computes the same
    logits to 1e-5, and the original model is left as it was."""
    ids = torch.randint(1, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    for model in (loaded.model, tiny_dense[0]):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        copy = linear_head_copy(model)
        with torch.no_grad():
            expected, got = model(input_ids=ids).logits, copy(input_ids=ids).logits  # (B, T, V)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        linear = {name for name, m in copy.named_modules() if isinstance(m, torch.nn.Linear)}
        head = {"keys", "values", "unembedding"} if model.prototypes is not None else {"unembedding"}
        assert head <= linear and len(linear) > len(head)  # the backbone's layers too
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name])


def test_linear_head_copy_has_the_heads_gradients(loaded):
    """float64: the gradients of K and W through the nn.Linear head equal the model's own."""
    ids = torch.randint(1, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    model = copy.deepcopy(loaded.model).double().requires_grad_(True)
    linear = linear_head_copy(model).double()
    for m in (model, linear):
        m.zero_grad()
        logits = m(input_ids=ids).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    torch.testing.assert_close(linear.keys.weight.grad, model.prototypes.keys.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(linear.values.weight.grad.T, model.prototypes.values.grad, atol=1e-10, rtol=1e-8)


@needs("kronfluence")
def test_kronfluence_ekfac_on_the_prism_model(loaded):
    """EK-FAC over the PRISM model's linear copy (backbone and head) finds the repeated example."""
    model = linear_head_copy(loaded.model)
    rows = torch.randint(1, 512, (12, 16), generator=torch.Generator().manual_seed(0)).tolist()
    queries = query_examples([rows[3][:6], rows[7][:4]], [rows[3][6:], rows[7][4:]], pad_id=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = ekfac_scores(model, training_examples(rows), queries, train_batch_size=4, single_query=True)
    check(result, before, model)
    assert result.single_query_seconds > 0


@needs("bm25s")
def test_bm25_adapter():
    docs = ["the cat sat on the mat", "dogs chase the postman", "the capital of Zorbania is Quelmiry"]
    result = bm25_scores(docs, ["Zorbania's capital city is called Quelmiry", "a cat on a mat"])
    assert result.scores.shape == (2, 3)
    assert result.scores.argmax(axis=1).tolist() == [2, 0]
    assert result.bytes_per_example > 0 and result.single_query_seconds is not None


def test_document_windows_cover_every_target_once():
    docs = [list(range(1, 11)), [20, 21], list(range(30, 34))]
    windows, owner = document_windows(docs, 4, pad_id=0)
    assert owner.tolist() == [0, 0, 0, 1, 2]
    targets = {d: [] for d in range(3)}
    for labels, d in zip(windows.labels.tolist(), owner.tolist(), strict=True):
        targets[d] += [t for t in labels if t != -100]
    assert targets == {0: list(range(2, 11)), 1: [21], 2: [31, 32, 33]}
    summed = sum_windows(np.arange(10.0).reshape(2, 5), owner, 3)
    assert summed.tolist() == [[3.0, 3.0, 4.0], [18.0, 8.0, 9.0]]
    with pytest.raises(BaselineError, match="length >= 2"):
        document_windows(docs, 1, pad_id=0)
