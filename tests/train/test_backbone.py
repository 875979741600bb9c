"""`prism train --backbone`: PRISM on top of a saved pretrained decoder (a tiny random Llama)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from core.bundle import load_bundle
from core.data.corpus import load_corpus, train_tokenizer
from core.generation import generate_text
from core.model.config import PrismConfig
from core.model.modeling import PrismForCausalLM
from core.train.backbone import load_backbone_weights, read_backbone_config
from core.train.trainer import PRESETS, TrainOptions, build_backbone_config, train
from tests.helpers import assert_one_line_error, run

CONTEXT = 128  # the Llama's max_position_embeddings: longer than the tiny preset's 64-token sequences


def save_llama(folder, corpus, tied: bool):
    """A tiny Llama with random weights and a tokenizer trained on ``corpus``, as save_pretrained writes them."""
    texts = load_corpus(corpus).train["text"]
    tokenizer = train_tokenizer(iter(texts), 300, CONTEXT)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory, small_corpus):
    return save_llama(tmp_path_factory.mktemp("llama") / "untied", small_corpus, tied=False)


@pytest.mark.parametrize("tied", [False, True])
def test_dense_start_computes_exactly_what_the_pretrained_decoder_computes(tmp_path, small_corpus, llama, tied):
    folder = llama if not tied else save_llama(tmp_path / "tied", small_corpus, tied=True)
    backbone = read_backbone_config(folder)
    model = PrismForCausalLM(build_backbone_config(backbone, PRESETS["tiny"], dense=True))
    load_backbone_weights(model, folder)
    assert (model.lm_head is None) == tied
    reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, backbone.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


def test_backbone_trains_with_a_frozen_start_and_the_bundle_loads(tmp_path, small_corpus, llama):
    out = tmp_path / "prism"
    record = train(
        TrainOptions(
            corpus=str(small_corpus),
            out=str(out),
            preset="tiny",
            backbone=str(llama),
            freeze_backbone=3,
            max_steps=6,
            save_steps=3,
            device="cpu",
            progress=False,
        )
    )
    assert record["backbone"] == str(llama) and record["steps"] == 6
    pretrained = load_file(llama / "model.safetensors")  # keys model.* and lm_head.weight, as in PRISM
    frozen = load_file(out / "checkpoints" / "checkpoint-3" / "model.safetensors")
    final = load_file(out / "model.safetensors")
    backbone_keys = [k for k in pretrained if k.startswith("model.") or k == "lm_head.weight"]
    assert backbone_keys and all(k in frozen for k in backbone_keys)
    for key in backbone_keys:  # the first 3 steps trained the head alone
        assert torch.equal(frozen[key], pretrained[key]), key
    assert not torch.equal(frozen["prototypes.keys"], final["prototypes.keys"])
    moved = [k for k in backbone_keys if not torch.equal(final[k], pretrained[k])]
    assert len(moved) == len(backbone_keys)  # then everything trained

    bundle = load_bundle(out)
    config = bundle.model.config
    assert config.sequence_length == PRESETS["tiny"].seq_len  # packing length, its own field
    assert config.get_text_config().max_position_embeddings == CONTEXT
    assert config.tie_word_embeddings is False and bundle.model.lm_head is not None
    assert len(generate_text(bundle, "The", max_new_tokens=4).text) > 0
    assert json.loads((out / "config.json").read_text())["sequence_length"] == PRESETS["tiny"].seq_len


def test_a_bundle_without_sequence_length_reads_the_backbone_context():
    """Bundles written before the field existed packed by max_position_embeddings: keep that."""
    saved = {"model_type": "prism", "num_prototypes": 8, "prototype_top_k": 2}
    config = PrismConfig.from_dict({**saved, "text_config": {"max_position_embeddings": 96}})
    assert config.sequence_length == 96


def test_backbone_errors_are_one_line(tmp_path, capsys, small_corpus, llama):
    common = ["train", "--corpus", small_corpus, "--preset", "tiny", "--device", "cpu", "--quiet", "--max-steps", "1"]
    code, _, err = run([*common, "--out", tmp_path / "a", "--backbone", tmp_path / "missing"], capsys)
    assert_one_line_error(code, err, "--backbone", "not found")
    (tmp_path / "no-tok").mkdir()
    LlamaConfig.from_pretrained(llama).save_pretrained(tmp_path / "no-tok")
    code, _, err = run([*common, "--out", tmp_path / "b", "--backbone", tmp_path / "no-tok"], capsys)
    assert_one_line_error(code, err, "no tokenizer.json", "--tokenizer")
    PrismConfig(num_prototypes=8, prototype_top_k=2).save_pretrained(tmp_path / "prism")
    code, _, err = run([*common, "--out", tmp_path / "c", "--backbone", tmp_path / "prism"], capsys)
    assert_one_line_error(code, err, "is a PRISM bundle")
    code, _, err = run([*common, "--out", tmp_path / "d", "--freeze-backbone", "2"], capsys)
    assert_one_line_error(code, err, "--freeze-backbone needs --backbone")
