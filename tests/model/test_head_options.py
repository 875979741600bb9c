"""The head's sparsity options (k annealing, concentration loss, weight power, many prototypes with
few active): each trains a tiny model in seconds and keeps every promise of the default head,
exact float64 slices, exactly k non-negative weights, suppression, the Auto* round trip and
cache vs no-cache generation; and each option's own arithmetic against its definition."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.bundle import load_bundle
from core.model.head import PrototypeHead, prototype_weights, prototype_weights_grad
from core.model.losses import concentration_loss
from core.train.callbacks import annealed_top_k
from core.train.presets import PRESETS
from core.train.trainer import TrainOptions, build_config, train
from tests.model.test_modeling import relative_error, tiny_config

OPTIONS = {
    "anneal": {"prototype_top_k_start": 32, "top_k_anneal_fraction": 0.5},
    "concentration": {"concentration_weight": 0.5},
    "power": {"weight_power": 2.0},
    "learned-power": {"weight_power": 1.5, "learn_weight_power": True},
    "many-prototypes": {"num_prototypes": 256, "prototype_top_k": 4, "router_gradient": "all"},
}
STEPS = 30


@pytest.fixture(scope="module", params=sorted(OPTIONS))
def trained(request, tmp_path_factory, small_corpus):
    """(option name, its bundle folder, the loaded bundle): the tiny preset trained STEPS steps."""
    out = tmp_path_factory.mktemp(f"option-{request.param}") / "tiny"
    opts = TrainOptions(
        corpus=str(small_corpus),
        out=str(out),
        preset="tiny",
        max_steps=STEPS,
        device="cpu",
        progress=False,
        overrides=OPTIONS[request.param],
    )
    train(opts)
    return request.param, out, load_bundle(out)


def test_slices_are_exact_in_float64_for_every_token(trained):
    _, _, bundle = trained
    model = bundle.model.double()
    try:
        ids = torch.tensor([bundle.tokenizer("ROMEO. What light through yonder window breaks?")["input_ids"]])
        logits = model(ids).logits  # (1, T, V)
        every = torch.arange(logits.shape[-1]).expand(*ids.shape, -1)  # (1, T, V)
        out = model(ids, return_prototypes=True, slice_token_ids=every)
        assert relative_error(out.prototype_slices, logits).max() < 1e-10
    finally:
        model.float()


def test_exactly_k_non_negative_weights_and_suppression_never_active(trained):
    _, _, bundle = trained
    model, k, P = bundle.model, bundle.model.config.prototype_top_k, bundle.model.config.num_prototypes
    assert model.prototypes.top_k == k  # annealing ends at the config's k
    ids = torch.tensor([bundle.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    out = model(ids, return_prototypes=True)
    assert out.prototype_weights.shape[-1] == k and (out.prototype_weights > 0).all()
    assert all(len(row.unique()) == k for row in out.prototype_ids.view(-1, k))
    suppressed = torch.zeros(P, dtype=torch.bool)
    suppressed[out.prototype_ids.flatten().unique()[: P - k]] = True
    after = model(ids, return_prototypes=True, suppressed_prototypes=suppressed)
    assert not suppressed[after.prototype_ids].any()
    assert (after.prototype_weights > 0).all()


def test_auto_round_trip_and_cached_generation(trained, tmp_path):
    name, _, bundle = trained
    model, tok = bundle.model, bundle.tokenizer
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([tok("HAMLET. To be, or not")["input_ids"]])
    a, b = model(ids, return_prototypes=True), again(ids, return_prototypes=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.prototype_weights, b.prototype_weights)
    if name == "learned-power":
        assert torch.equal(again.prototypes.log_weight_power, model.prototypes.log_weight_power)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id, attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_each_option_acts_in_training(trained):
    name, out, bundle = trained
    history = json.loads((out / "training.json").read_text())["log_history"]
    assert ("concentration" in name) == any("loss_concentration" in h for h in history)
    if name == "learned-power":
        assert bundle.model.prototypes.weight_power.item() != pytest.approx(1.5, abs=1e-6)  # it trained
    if name == "many-prototypes":
        assert bundle.model.prototypes.keys.shape[0] == 256


def test_annealed_top_k_schedule():
    schedule = [annealed_top_k(64, 16, 0.5, step, 100) for step in range(101)]
    assert schedule[0] == 64 and schedule[25] == 40 and schedule[50:] == [16] * 51
    assert all(a >= b for a, b in zip(schedule, schedule[1:], strict=False))  # never widens again
    assert annealed_top_k(8, 8, 1.0, 3, 10) == 8


def test_demo_preset_anneals_prism_models_only():
    demo = PRESETS["demo"]
    assert demo.top_k_start is not None and demo.top_k_start > demo.top_k
    prism = build_config(demo, 512, 0, dense=False)
    assert (prism.prototype_top_k_start, prism.prototype_top_k) == (demo.top_k_start, demo.top_k)
    assert build_config(demo, 512, 0, dense=True).prototype_top_k_start is None  # the twin has no k
    # A final k above the preset's start trains at that k throughout; an explicit start wins.
    assert build_config(demo, 512, 0, dense=False, prototype_top_k=128).prototype_top_k_start is None
    assert build_config(demo, 512, 0, dense=False, prototype_top_k_start=32).prototype_top_k_start == 32
    assert build_config(PRESETS["tiny"], 512, 0, dense=False).prototype_top_k_start is None


def test_weight_power_and_its_gradient_follow_the_definition():
    scores = torch.randn(50, dtype=torch.float64, requires_grad=True)
    for power in (1.0, 2.0, 0.5, torch.tensor(3.0, dtype=torch.float64)):
        weights = prototype_weights(scores, power)
        expected = torch.log1p(torch.exp(scores)) ** power
        torch.testing.assert_close(weights, expected, rtol=1e-12, atol=0)
        (grad,) = torch.autograd.grad(expected.sum(), scores)
        torch.testing.assert_close(prototype_weights_grad(scores.detach(), power), grad, rtol=1e-12, atol=0)


def test_learned_power_is_a_parameter_only_when_asked():
    assert PrototypeHead(8, 4, 2).log_weight_power is None
    head = PrototypeHead(8, 4, 2, weight_power=2.0, learn_weight_power=True)
    assert "log_weight_power" in dict(head.named_parameters())
    assert head.weight_power.item() == pytest.approx(2.0)


def test_concentration_loss_follows_its_definition():
    one_hot = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    uniform = torch.full((2, 4), 0.7)
    assert concentration_loss(one_hot).item() == pytest.approx(0.0, abs=1e-9)
    assert concentration_loss(uniform).item() == pytest.approx(1.0)
    mixed = torch.tensor([[1.0, 1.0, 2.0]], dtype=torch.float64)
    p = mixed / mixed.sum()
    assert concentration_loss(mixed).item() == pytest.approx(float(-(p * p.log()).sum() / math.log(3)))
    assert concentration_loss(torch.ones(5, 1)).item() == 0.0  # k = 1: nothing to concentrate


def test_option_validation():
    with pytest.raises(ValueError, match="prototype_top_k_start"):
        tiny_config(prototype_top_k_start=2)  # below k = 4
    with pytest.raises(ValueError, match="prototype_top_k_start"):
        tiny_config(prototype_top_k_start=25)  # above P = 24
    with pytest.raises(ValueError, match="top_k_anneal_fraction"):
        tiny_config(prototype_top_k_start=8, top_k_anneal_fraction=0.0)
    with pytest.raises(ValueError, match="weight_power"):
        tiny_config(weight_power=0.0)
    with pytest.raises(ValueError, match="concentration_weight"):
        tiny_config(concentration_weight=-0.1)
