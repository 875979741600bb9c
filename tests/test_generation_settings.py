"""Generation settings: validation, greedy as transformers does it, the repetition options on
greedy decoding, seeded sampling, the CLI's options, and attribution of exactly the tokens
produced whatever the settings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core.attribution.decompose import decompose
from core.generation import DEFAULT_GENERATION, GREEDY, GenerationSettings, describe_generation, generate_text
from tests.helpers import PROMPT, assert_one_line_error, run

PROMPTS = ["The king", "HAMLET.", "Package: lib", "It is a truth"]
SAMPLED = GenerationSettings(do_sample=True, temperature=0.9, top_p=0.9, repetition_penalty=1.1)


def plain_generate(bundle, prompt: str, n: int, **kwargs) -> list[int]:
    """transformers' own generate on the prompt's ids (the new ids, cut at the end-of-text token)."""
    ids = torch.tensor([bundle.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    eos = bundle.tokenizer.eos_token_id
    out = bundle.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, pad_token_id=eos, **kwargs)
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(eos)] if eos in new else new


def repeated_ngrams(ids: list[int], n: int) -> int:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"do_sample": True, "temperature": 0.0}, r"temperature must be > 0"),
        ({"do_sample": True, "temperature": math.nan}, r"temperature must be a number"),
        ({"do_sample": True, "temperature": math.inf}, r"temperature must be a finite number"),
        ({"do_sample": True, "top_p": 0.0}, r"top_p must be > 0"),
        ({"do_sample": True, "top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be > 0"),
        ({"repetition_penalty": "1.2"}, r"repetition_penalty must be a number"),
        ({"no_repeat_ngram_size": -1}, r"no_repeat_ngram_size must be >= 0"),
        ({"no_repeat_ngram_size": 2.5}, r"no_repeat_ngram_size must be an integer"),
        ({"do_sample": "yes"}, r"do_sample must be True or False"),
        ({"temperature": 0.7}, r"temperature 0.7 applies only when sampling: set do_sample=True"),
        ({"top_p": 0.9}, r"top_p 0.9 applies only when sampling"),
    ],
)
def test_bad_settings_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        GenerationSettings(**fields)


def test_settings_round_trip_and_words(loaded):
    assert GREEDY == GenerationSettings() and not GREEDY.do_sample
    assert GenerationSettings.from_json({**SAMPLED.to_json(), "seed": 4}) == SAMPLED
    assert describe_generation({**SAMPLED.to_json(), "seed": 4}) == (
        "sampled with seed 4, temperature 0.9, top-p 0.9, repetition penalty 1.1"
    )
    assert GREEDY.describe(3) == "generated greedily"
    assert GenerationSettings(no_repeat_ngram_size=3).describe() == "generated greedily, no repeated 3-grams"
    assert describe_generation(None) == "generated"
    assert GREEDY.generate_kwargs() == {"do_sample": False}
    assert SAMPLED.generate_kwargs()["top_k"] == 0  # transformers' default top-k of 50 is off
    with pytest.raises(ValueError, match="settings must be a GenerationSettings, got dict"):
        generate_text(loaded, "The", 4, settings={"do_sample": True})


def test_default_is_used_when_no_settings_are_given(loaded):
    assert generate_text(loaded, "The king", 12, seed=2).new_ids == (
        generate_text(loaded, "The king", 12, seed=2, settings=DEFAULT_GENERATION).new_ids
    )


def test_greedy_is_transformers_greedy(loaded):
    for prompt in PROMPTS:
        assert generate_text(loaded, prompt, 16, settings=GREEDY).new_ids == plain_generate(
            loaded, prompt, 16, do_sample=False
        )


def test_repetition_options_apply_to_greedy_decoding(loaded):
    penalised = GenerationSettings(repetition_penalty=1.5)
    changed = 0
    for prompt in PROMPTS:
        got = generate_text(loaded, prompt, 24, settings=penalised).new_ids
        assert got == plain_generate(loaded, prompt, 24, do_sample=False, repetition_penalty=1.5)
        changed += got != generate_text(loaded, prompt, 24, settings=GREEDY).new_ids
    assert changed > 0  # the model honours the penalty: some greedy text changes


def test_no_repeat_ngram_size_leaves_no_repeated_ngram(loaded):
    banned = GenerationSettings(no_repeat_ngram_size=3)
    looping = 0
    for prompt in PROMPTS:
        plain = generate_text(loaded, prompt, 40, settings=GREEDY)
        looping += repeated_ngrams(plain.prompt_ids + plain.new_ids, 3) > 0
        result = generate_text(loaded, prompt, 40, settings=banned)
        assert len(result.new_ids) > 3
        assert repeated_ngrams(result.prompt_ids + result.new_ids, 3) == 0, prompt  # prompt included, as transformers
    assert looping > 0  # plain greedy decoding of the tiny model does repeat itself


def test_sampling_is_seeded(loaded):
    for prompt in PROMPTS:
        first = generate_text(loaded, prompt, 16, seed=7, settings=SAMPLED)
        assert generate_text(loaded, prompt, 16, seed=7, settings=SAMPLED).new_ids == first.new_ids
        assert generate_text(loaded, prompt, 16, seed=8, settings=SAMPLED).new_ids != first.new_ids, prompt


def test_generate_cli_takes_the_settings(tiny_bundle, loaded, capsys):
    base = ["generate", "--model", tiny_bundle, "--prompt", "The king", "--max-new-tokens", "12"]
    flags = ["--sample", "--temperature", "0.9", "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "5"]
    flags += ["--no-repeat-ngram-size", "0"]  # every option given: whatever the measured defaults are
    code, out, err = run([*base, *flags], capsys)
    assert code == 0, err
    expected = generate_text(loaded, "The king", 12, seed=5, settings=SAMPLED)
    assert out == expected.prompt + expected.text + "\n"
    code, out, err = run([*base, "--greedy"], capsys)
    assert code == 0, err
    assert out == "The king" + generate_text(loaded, "The king", 12, settings=GREEDY).text + "\n"
    code, out, err = run([*base, "--no-sample", "--no-repeat-ngram-size", "3", "--repetition-penalty", "1"], capsys)
    assert code == 0, err
    banned = generate_text(loaded, "The king", 12, settings=GenerationSettings(no_repeat_ngram_size=3))
    assert out == "The king" + banned.text + "\n"
    code, out, err = run(base, capsys)  # the measured defaults
    assert code == 0, err
    assert out == "The king" + generate_text(loaded, "The king", 12).text + "\n"


def test_unset_options_take_the_measured_defaults():
    from core.cli import build_parser
    from core.commands import generation_from_args

    def settings(*extra: str) -> GenerationSettings:
        return generation_from_args(build_parser().parse_args(["generate", "--prompt", "x", *extra]))

    assert settings() == DEFAULT_GENERATION
    assert settings("--greedy") == GREEDY
    assert settings("--no-sample") == GenerationSettings(
        repetition_penalty=DEFAULT_GENERATION.repetition_penalty,
        no_repeat_ngram_size=DEFAULT_GENERATION.no_repeat_ngram_size,
    )
    assert settings("--sample", "--top-p", "0.5").top_p == 0.5
    assert settings("--repetition-penalty", "1.3").repetition_penalty == 1.3


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--greedy", "--temperature", "0.5"], ["--greedy is plain greedy decoding", "--temperature"]),
        (["--no-sample", "--top-p", "0.5"], ["--top-p apply only when sampling", "--sample"]),
        (["--top-p", "1.5"], ["top_p must be in (0, 1]"]),
        (["--temperature", "0"], ["--temperature", "must be > 0.0"]),
        (["--no-repeat-ngram-size", "-1"], ["--no-repeat-ngram-size", "must be >= 0"]),
    ],
)
def test_generate_cli_refuses_bad_settings(extra, needles, tiny_bundle, capsys):
    code, _, err = run(["generate", "--model", tiny_bundle, "--prompt", "The king", *extra], capsys)
    assert_one_line_error(code, err, *needles)


def test_attribution_of_a_sampled_completion_is_exactly_its_tokens(loaded):
    produced = generate_text(loaded, "The king", 12, seed=3, settings=SAMPLED)
    dec = decompose(loaded, prompt="The king", max_new_tokens=12, generation=SAMPLED, seed=3)
    assert dec.generated and dec.generation == {**SAMPLED.to_json(), "seed": 3}
    assert dec.completion_ids == produced.new_ids and dec.prompt_ids == produced.prompt_ids
    assert [t.token_id for t in dec.tokens] == produced.new_ids
    ids = torch.tensor([produced.prompt_ids + produced.new_ids])  # (1, T)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids[:, :-1]).logits[0, len(produced.prompt_ids) - 1 :]  # (n, V)
    expected = logits.gather(1, torch.tensor(produced.new_ids)[:, None])[:, 0].tolist()  # (n,)
    for token, logit in zip(dec.tokens, expected, strict=True):
        total = sum(p.slice for p in token.prototypes)
        assert total == pytest.approx(token.logit, rel=1e-4, abs=1e-4)
        assert token.logit == pytest.approx(logit, rel=1e-4, abs=1e-4)
    greedy = decompose(loaded, prompt="The king", max_new_tokens=12, generation=GREEDY)
    assert greedy.completion_ids == generate_text(loaded, "The king", 12, settings=GREEDY).new_ids


def test_attribute_cli_records_the_settings(planted_bundle, planted, capsys):
    bundle, _ = planted
    base = ["attribute", "--model", planted_bundle, "--prompt", PROMPT, "--max-new-tokens", "6"]
    base += ["--method", "neighbourhood", "--top", "2"]
    flags = ["--sample", "--temperature", "0.9", "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "11"]
    flags += ["--no-repeat-ngram-size", "0"]
    code, out, err = run([*base, *flags, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    produced = generate_text(bundle, PROMPT, 6, seed=11, settings=SAMPLED)
    assert result["generated"] and result["generation"] == {**SAMPLED.to_json(), "seed": 11}
    assert [t["token_id"] for t in result["tokens"]] == produced.new_ids
    code, out, err = run([*base, "--greedy"], capsys)
    assert code == 0, err
    assert "(generated greedily)" in out.splitlines()[1]
    code, out, err = run([*base, *flags], capsys)
    assert code == 0, err
    assert "(sampled with seed 11, temperature 0.9, top-p 0.9, repetition penalty 1.1)" in out.splitlines()[1]
    code, _, err = run([*base, "--completion", " and more", "--temperature", "0.5", "--seed", "2"], capsys)
    assert_one_line_error(code, err, "--temperature, --seed", "with --completion nothing is generated")
