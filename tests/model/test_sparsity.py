"""The sparsity measures of core/model/sparsity.py: definitions on known slices, and slices of a
real tiny model that sum to its logits."""

import numpy as np
import pytest
import torch

from core.model.sparsity import distinct_prototypes, slice_concentration, target_slices


def test_concentration_follows_its_definition():
    slices = torch.tensor([[4.0, -3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    summary = slice_concentration(slices)
    assert summary.positions == 2  # the row without slice mass is left out
    assert summary.top1_share == pytest.approx((0.4 + 1.0) / 2)
    assert summary.top4_share == pytest.approx(1.0) and summary.top8_share == pytest.approx(1.0)  # k = 4
    # 80% of |4| + |-3| + |2| + |1| = 10 needs 4 + 3 + 2 (three slices); of the lone 5, one.
    assert summary.effective_k_median == 2.0 and summary.effective_k_mean == pytest.approx(2.0)
    assert slice_concentration(slices, mass=0.4).effective_k_mean == pytest.approx(1.0)


def test_target_slices_of_a_trained_model_sum_to_its_logits(loaded):
    model = loaded.model
    ids = torch.tensor([loaded.tokenizer.encode("the quick brown fox jumps over the lazy dog again and again")])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0]
        logits = model(input_ids=ids).logits[0]
    targets = ids[0, 1:]
    slices = target_slices(model, hidden[:-1], targets)
    assert slices.shape == (len(targets), model.config.prototype_top_k)
    expected = logits[:-1].gather(1, targets.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(slices.sum(-1), expected.float(), rtol=1e-4, atol=1e-4)
    windows = distinct_prototypes(model, hidden[None, : (len(hidden) // 4) * 4], window=4)
    assert len(windows) == len(hidden) // 4
    k = model.config.prototype_top_k
    assert ((windows >= k) & (windows <= min(4 * k, model.config.num_prototypes))).all()
    assert isinstance(windows, np.ndarray)
