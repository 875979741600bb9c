"""Post-hoc baselines on a tiny dense model: the Kronfluence (EK-FAC) and dattri (LoGra)
adapters run and find a training example that the query repeats. Skipped with the reason when
the bench extras (requirements-bench.txt) are not installed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from core.attribution.baselines import BaselineError, ekfac_scores, logra_scores, query_examples, training_examples


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
