"""Every caller of the prototype head's arithmetic, held to one written-out definition.

The head's formula lives in core/model/head.py; the model, calibration, influence and the atlas
call it. Each test here computes the same quantity from the definition below (float64, written
out with exp/log, not with the library's functions) and compares it with what a caller gives."""

from __future__ import annotations

import pytest
import torch

from core.model.head import PrototypeHead

P, D, K, V, N = 12, 6, 3, 9, 20


def definition(hidden, keys, values, top_k, gains=None, suppressed=None, power=1.0):
    """s = h K^T; S = top-k of s outside the suppressed; a_j = log(1 + exp(s_j))^p g_j; z = sum a_j W_j."""
    scores = hidden @ keys.T  # (N, P)
    if suppressed is not None:
        scores = scores.masked_fill(suppressed, float("-inf"))
    top, ids = scores.topk(top_k, dim=-1)  # (N, k)
    weights = torch.log1p(torch.exp(top)) ** power
    if gains is not None:
        weights = weights * gains[ids]
    mixed = (weights.unsqueeze(-1) * values[ids]).sum(1)  # (N, d)
    return ids, weights, mixed


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    keys = torch.randn(P, D, generator=g, dtype=torch.float64)
    values = torch.randn(P, D, generator=g, dtype=torch.float64)
    embedding = torch.randn(V, D, generator=g, dtype=torch.float64)
    gains = torch.rand(P, generator=g, dtype=torch.float64) * 2
    suppressed = torch.zeros(P, dtype=torch.bool)
    suppressed[[1, 7]] = True
    return hidden, keys, values, embedding, gains, suppressed


def test_prototype_head_forward_matches_the_definition():
    hidden, keys, values, _, gains, suppressed = _tensors()
    head = PrototypeHead(P, D, K).double().eval()
    with torch.no_grad():
        head.keys.copy_(keys)
        head.values.copy_(values)
    act = head(hidden, gains, suppressed)
    ids, weights, mixed = definition(hidden, keys, values, K, gains, suppressed)
    assert torch.equal(act.ids, ids)
    torch.testing.assert_close(act.weights, weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act.mixed, mixed, rtol=1e-12, atol=1e-12)


def test_influence_active_set_and_probabilities_match_the_definition():
    from core.attribution.influence import active_set, head_probabilities

    hidden, keys, values, embedding, _, _ = _tensors(1)
    ids, weights = active_set(hidden, keys, K)
    ref_ids, ref_weights, ref_mixed = definition(hidden, keys, values, K)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-12, atol=1e-12)
    probs = head_probabilities(ids, weights, values, embedding)
    torch.testing.assert_close(probs, (ref_mixed @ embedding.T).softmax(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("power", [1.0, 2.0, 2.5])
def test_influence_gradients_match_autograd_of_the_definition(power):
    from core.attribution.influence import active_set, head_probabilities, prototype_gradients

    hidden, keys, values, embedding, gains, _ = _tensors(2)
    targets = torch.arange(N) % V
    ids, weights = active_set(hidden, keys, K, power)
    weights = weights * gains[ids]
    probs = head_probabilities(ids, weights, values, embedding)
    grads = prototype_gradients(hidden, ids, weights, probs, targets, keys, values, embedding, gains, power)
    for t in range(3):
        K_ = keys.clone().requires_grad_(True)
        W_ = values.clone().requires_grad_(True)
        _, _, mixed = definition(hidden[t : t + 1], K_, W_, K, gains, power=power)
        loss = torch.nn.functional.cross_entropy(mixed @ embedding.T, targets[t : t + 1])
        gK, gW = torch.autograd.grad(loss, (K_, W_))
        expected = torch.cat([gK[ids[t]], gW[ids[t]]], dim=-1)  # (k, 2d)
        torch.testing.assert_close(grads[t], expected, rtol=1e-9, atol=1e-12)


def test_calibration_cached_scores_match_the_definition():
    from core.control.calibration import ChoiceCache, cached_scores

    hidden, keys, values, embedding, gains, _ = _tensors(3)
    ids, base, _ = definition(hidden, keys, values, K)  # weights before gains
    targets = torch.arange(N) % V
    segment = torch.arange(N) // 5  # four (item, choice) segments of five tokens
    cache = ChoiceCache(
        ids=ids,
        base=base,
        targets=targets,
        segment=segment,
        pairs=torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]]),
        answers=torch.tensor([0, 1]),
        choices=torch.tensor([2, 2]),
    )
    _, _, mixed = definition(hidden, keys, values, K, gains)
    logp = (mixed @ embedding.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)  # (N,)
    expected = logp.reshape(4, 5).mean(1)
    torch.testing.assert_close(cached_scores(cache, gains, values, embedding), expected, rtol=1e-12, atol=1e-12)


def test_atlas_context_fidelity_uses_the_active_set_of_the_definition():
    import numpy as np

    from core.atlas.layout import context_fidelity

    hidden, keys, values, _, _, _ = _tensors(4)
    ref_ids, _, _ = definition(hidden, keys, values, K)
    rows = [np.arange(j % 5, N, 3) for j in range(P)]  # some neighbour rows per prototype
    fidelity = context_fidelity(hidden.numpy(), keys.numpy(), K, rows)
    expected = [float(np.mean([(ref_ids[r] == j).any().item() for r in row])) for j, row in enumerate(rows)]
    np.testing.assert_allclose(fidelity, expected)
