"""The PRISM model: exact slices, sparse non-negative mixtures, controls, transformers contract."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

import core  # noqa: F401  (registers the prism model type)
from core import PrismConfig, PrismForCausalLM, prototype_slices
from core.model.head import PrototypeHead


def tiny_config(**overrides) -> PrismConfig:
    text = dict(
        model_type="llama",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return PrismConfig(text_config=text, **{"num_prototypes": 24, "prototype_top_k": 4, **overrides})


def relative_error(parts: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """|sum(parts) - whole| relative to the size of the summands (the float error scale)."""
    return (parts.sum(-1) - whole).abs() / parts.abs().sum(-1).clamp_min(1e-6)


def test_slices_sum_to_logits_for_chosen_and_top5_alternatives(loaded):
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([tok("ROMEO. What light through yonder window breaks?")["input_ids"]])
    logits = model(ids).logits  # (1, T, V)
    top6 = logits.topk(6, dim=-1).indices  # chosen (greedy) token and its 5 alternatives
    out = model(ids, return_prototypes=True, slice_token_ids=top6)
    assert out.prototype_slices.shape == (1, ids.shape[1], 6, model.config.prototype_top_k)
    target = logits.gather(-1, top6)  # (1, T, 6)
    err = relative_error(out.prototype_slices, target)
    assert err.max() < 1e-4
    # Default slices are those of the argmax token.
    default = model(ids, return_prototypes=True).prototype_slices[..., 0, :]
    assert torch.allclose(default.sum(-1), logits.max(-1).values, rtol=1e-4, atol=1e-5)


def test_exactly_k_positive_weights_per_position(loaded):
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    out = model(ids, return_prototypes=True)
    k = model.config.prototype_top_k
    assert out.prototype_weights.shape[-1] == k
    assert (out.prototype_weights > 0).all()
    # Active ids are distinct within a position.
    assert all(len(set(row.tolist())) == k for row in out.prototype_ids.reshape(-1, k))


def test_suppressed_prototypes_never_active(loaded):
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([tok("def main(argv):\n    return 0")["input_ids"]])
    before = model(ids, return_prototypes=True).prototype_ids
    suppressed = torch.zeros(model.config.num_prototypes, dtype=torch.bool)
    victims = before.flatten().unique()[:10]
    suppressed[victims] = True
    after = model(ids, return_prototypes=True, suppressed_prototypes=suppressed)
    assert not torch.isin(after.prototype_ids, victims).any()
    assert (after.prototype_weights > 0).all()  # the next prototypes take the freed places


def test_gains_act_linearly_on_slices(loaded):
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([tok("A dictionary definition of a word")["input_ids"]])
    base = model(ids, return_prototypes=True)
    gains = torch.rand(model.config.num_prototypes) * 3
    token_ids = base.logits.argmax(-1, keepdim=True)
    steered = model(ids, return_prototypes=True, prototype_gains=gains, slice_token_ids=token_ids)
    assert torch.equal(steered.prototype_ids, base.prototype_ids)  # gains act after selection
    expected = base.prototype_slices * gains[base.prototype_ids].unsqueeze(-2)
    assert torch.allclose(steered.prototype_slices, expected, rtol=1e-5, atol=1e-6)
    # Doubling all gains doubles every logit: the head is linear in the gains.
    doubled = model(ids, prototype_gains=torch.full((model.config.num_prototypes,), 2.0)).logits
    assert torch.allclose(doubled, 2 * base.logits, rtol=1e-5, atol=1e-5)


def test_gain_zero_differs_from_suppression(loaded):
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([tok("To be, or not to be")["input_ids"]])
    base = model(ids, return_prototypes=True)
    victim = int(base.prototype_ids[0, -1, 0])
    gains = torch.ones(model.config.num_prototypes)
    gains[victim] = 0.0
    zeroed = model(ids, return_prototypes=True, prototype_gains=gains)
    assert victim in zeroed.prototype_ids[0, -1].tolist()  # still holds its place, with weight 0
    mask = torch.zeros(model.config.num_prototypes, dtype=torch.bool)
    mask[victim] = True
    suppressed = model(ids, return_prototypes=True, suppressed_prototypes=mask)
    assert victim not in suppressed.prototype_ids[0, -1].tolist()  # the next one takes the place
    assert not torch.allclose(zeroed.logits[0, -1], suppressed.logits[0, -1])


def test_controls_never_mutate_the_model(loaded):
    model, tok = loaded.model, loaded.tokenizer
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([tok("Package: python3-numpy")["input_ids"]])
    gains_a = torch.rand(model.config.num_prototypes) * 2
    mask_b = torch.zeros(model.config.num_prototypes, dtype=torch.bool)
    mask_b[:5] = True
    alone_a = model(ids, prototype_gains=gains_a).logits
    alone_b = model(ids, suppressed_prototypes=mask_b).logits
    for _ in range(2):  # alternate on one loaded model
        assert torch.equal(model(ids, prototype_gains=gains_a).logits, alone_a)
        assert torch.equal(model(ids, suppressed_prototypes=mask_b).logits, alone_b)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_bad_controls_rejected():
    model = PrismForCausalLM(tiny_config()).eval()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="shape"):
        model(ids, prototype_gains=torch.ones(5))
    with pytest.raises(ValueError, match="non-negative"):
        model(ids, prototype_gains=-torch.ones(24))
    with pytest.raises(ValueError, match="bool mask"):
        model(ids, suppressed_prototypes=torch.zeros(24))
    with pytest.raises(ValueError, match="at most 20"):
        model(ids, suppressed_prototypes=torch.ones(24, dtype=torch.bool))
    dense = PrismForCausalLM(tiny_config(dense=True)).eval()
    with pytest.raises(ValueError, match="dense twin"):
        dense(ids, prototype_gains=torch.ones(24))


def test_config_validation():
    with pytest.raises(ValueError, match="prototype_top_k"):
        tiny_config(prototype_top_k=30)
    with pytest.raises(ValueError, match="num_prototypes"):
        tiny_config(num_prototypes=0)
    with pytest.raises(ValueError, match="diversity_margin"):
        tiny_config(diversity_margin=2.0)
    with pytest.raises(ValueError, match="cluster_weight"):
        tiny_config(cluster_weight=-1.0)


def test_save_load_and_auto_round_trip(tmp_path, loaded):
    model = loaded.model
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    assert AutoConfig.from_pretrained(tmp_path).model_type == "prism"
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(again, PrismForCausalLM)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    a, b = model(ids, return_prototypes=True), again(ids, return_prototypes=True)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.prototype_ids, b.prototype_ids)


def test_generate_with_and_without_cache_agree(loaded):
    model, tok = loaded.model, loaded.tokenizer
    for prompt in ["HAMLET. To be", "json.dumps(obj)", "dog (noun):"]:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        kw = dict(
            max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id, attention_mask=torch.ones_like(ids)
        )
        with_cache = model.generate(ids, use_cache=True, **kw)
        without = model.generate(ids, use_cache=False, **kw)
        assert torch.equal(with_cache, without)


def test_generate_applies_controls_per_call(loaded):
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([tok("The king said")["input_ids"]])
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id, attention_mask=torch.ones_like(ids))
    plain = model.generate(ids, **kw)
    first = model(plain).logits  # which prototypes drive the greedy path
    active = model(plain, return_prototypes=True).prototype_ids[0, ids.shape[1] - 1 :].flatten().unique()
    mask = torch.zeros(model.config.num_prototypes, dtype=torch.bool)
    mask[active[: model.config.num_prototypes - model.config.prototype_top_k]] = True
    steered = model.generate(ids, suppressed_prototypes=mask, **kw)
    assert not torch.equal(plain, steered)
    assert torch.equal(model.generate(ids, **kw), plain)  # nothing stuck to the model
    assert torch.equal(model(plain).logits, first)


# Property tests of the head's invariants, on random heads in float64.
@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 6),
    P=st.integers(2, 40),
    d=st.integers(2, 16),
    k_frac=st.floats(0.01, 1.0),
    seed=st.integers(0, 10_000),
    n_suppressed=st.integers(0, 10),
)
def test_head_invariants(n, P, d, k_frac, seed, n_suppressed):
    g = torch.Generator().manual_seed(seed)
    k = max(1, min(P, int(round(k_frac * P))))
    head = PrototypeHead(P, d, k).double()
    with torch.no_grad():
        head.keys.copy_(torch.randn(P, d, generator=g, dtype=torch.float64))
        head.values.copy_(torch.randn(P, d, generator=g, dtype=torch.float64))
    head.eval()
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    E = torch.randn(11, d, generator=g, dtype=torch.float64)
    suppressed = torch.zeros(P, dtype=torch.bool)
    n_suppressed = min(n_suppressed, P - k)
    suppressed[torch.randperm(P, generator=g)[:n_suppressed]] = True
    gains = torch.rand(P, generator=g, dtype=torch.float64) * 2
    act = head(hidden, gains=gains, suppressed=suppressed)
    assert act.ids.shape == (n, k) and (act.weights >= 0).all()
    assert not suppressed[act.ids].any()
    logits = act.mixed @ E.T  # (n, V)
    every_token = torch.arange(11).expand(n, 11)
    slices = prototype_slices(act.ids, act.weights, head.values, E, every_token)  # (n, V, k)
    assert torch.allclose(slices.sum(-1), logits, rtol=1e-10, atol=1e-10)
    # Sparse: the dense mixture weight vector has at most k non-zeros.
    dense = torch.zeros(n, P, dtype=torch.float64).scatter(1, act.ids, act.weights)
    assert ((dense != 0).sum(-1) <= k).all()


def test_router_gradient_all_keeps_the_forward_and_reaches_inactive_prototypes():
    """Straight-through routing: same logits and active sets; the loss's gradient reaches the
    keys of prototypes outside every active set (with `active` it reaches none of them)."""
    torch.manual_seed(0)
    reference = PrismForCausalLM(tiny_config()).state_dict()
    ids = torch.arange(24).view(2, 12) % 96 + 1
    grads = {}
    for mode in ("active", "all"):
        model = PrismForCausalLM(tiny_config(router_gradient=mode))
        model.load_state_dict(reference)
        model.train()
        out = model(input_ids=ids, labels=ids, return_prototypes=True)
        out.loss.backward()
        active = torch.zeros(24, dtype=torch.bool)
        active[out.prototype_ids.flatten()] = True
        grads[mode] = (out.logits.detach(), out.prototype_ids, model.prototypes.keys.grad.norm(dim=-1), active)
    (logits_a, ids_a, key_grad_a, active_a), (logits_b, ids_b, key_grad_b, _) = grads["active"], grads["all"]
    assert torch.equal(ids_a, ids_b) and torch.allclose(logits_a, logits_b, atol=1e-6)
    assert (~active_a).any(), "the test needs a prototype that no position activated"
    assert (key_grad_a[~active_a] == 0).all()
    assert (key_grad_b[~active_a] > 0).all()
    with pytest.raises(ValueError, match="router_gradient"):
        tiny_config(router_gradient="some")


def test_straight_through_mix_has_the_gradient_of_its_written_out_expression():
    """The fused straight-through mixture gives the value and the gradients (hidden states,
    keys, values) of z + Z - stop(Z), with gains and a suppressed set, in float64."""
    torch.manual_seed(0)
    P, d, k, n = 40, 12, 5, 30
    head = PrototypeHead(P, d, k, router_gradient="all").double().train()
    torch.nn.init.normal_(head.keys)
    torch.nn.init.normal_(head.values)
    hidden = torch.randn(n, d, dtype=torch.float64)
    upstream = torch.randn(n, d, dtype=torch.float64)
    gains = torch.rand(P, dtype=torch.float64) * 2
    suppressed = torch.zeros(P, dtype=torch.bool)
    suppressed[[3, 17, 29]] = True

    def written_out(h):
        scores = h @ head.keys.T
        top, ids = scores.masked_fill(suppressed, float("-inf")).topk(k, dim=-1)
        weights = torch.nn.functional.softplus(top) * gains[ids]
        sparse = torch.zeros(n, P, dtype=h.dtype).scatter(1, ids, weights) @ head.values
        full = (torch.nn.functional.softplus(scores).masked_fill(suppressed, 0.0) * gains) @ head.values
        return sparse + (full - full.detach())

    results = []
    for mix in (lambda h: head(h, gains, suppressed).mixed, written_out):
        head.zero_grad()
        h = hidden.clone().requires_grad_(True)
        z = mix(h)
        (z * upstream).sum().backward()
        results.append((z.detach(), h.grad, head.keys.grad.clone(), head.values.grad.clone()))
    for fused, reference in zip(*results, strict=True):
        assert torch.allclose(fused, reference, rtol=1e-10, atol=1e-12)
    assert (results[0][2][suppressed] == 0).all(), "a suppressed key got a gradient"
