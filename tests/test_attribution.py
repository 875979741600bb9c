"""Attribution: exact slices in the JSON, a planted example found, an index that refuses to be
misused, builds that do not depend on the batch size, atomic writes and one-line CLI errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.attribution.decompose import decompose
from core.attribution.engine import attribute, neighbour_codes
from core.attribution.influence import InfluenceArguments, build_influence
from core.attribution.neighbourhood import Credit as _Credit
from core.attribution.neighbourhood import neighbourhood_credit, rank_examples
from core.bundle import load_bundle, write_bundle
from core.cli import main
from core.control.controls import Controls
from core.data.corpus import CorpusError, load_corpus
from core.errors import PrototypeIndexError
from core.index.build import build_index
from core.index.format import index_dir, load_index

from .conftest import demo_rows, write_jsonl

CANARY = "The zorblax quivered under the violet moon of Tharsis."
PROMPT, COMPLETION = "The zorblax quivered under", " the violet moon of Tharsis."


@pytest.fixture(scope="module")
def planted_corpus(tmp_path_factory) -> Path:
    """50 short demo documents and 8 copies of a made-up sentence (about 2% of the tokens)."""
    rows = demo_rows(10, max_chars=400)
    rows += [{"id": f"canary-{i}", "text": CANARY, "source": "canary"} for i in range(8)]
    random.Random(0).shuffle(rows)
    return write_jsonl(tmp_path_factory.mktemp("planted") / "planted.jsonl", rows)


@pytest.fixture(scope="module")
def planted_bundle(tmp_path_factory, planted_corpus) -> Path:
    """A tiny PRISM model (128 prototypes) trained 250 steps on the planted corpus, indexed."""
    from core.train.trainer import TrainOptions, train

    out = tmp_path_factory.mktemp("planted_bundle") / "tiny"
    train(
        TrainOptions(
            corpus=str(planted_corpus),
            out=str(out),
            preset="tiny",
            max_steps=250,
            progress=False,
            overrides={"num_prototypes": 128},
        )
    )
    build_index(out, planted_corpus, show_progress=False)
    return out


@pytest.fixture(scope="module")
def planted(planted_bundle):
    return load_bundle(planted_bundle), load_index(planted_bundle)


def unindexed_copy(bundle: Path, dest: Path) -> Path:
    return Path(shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns("index", ".index-*")))


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("prism: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_json_contract_and_slices_sum_to_logits(planted_bundle, capsys):
    args = ["attribute", "--model", planted_bundle, "--prompt", PROMPT, "--completion", COMPLETION, "--json"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert {"model", "prompt", "tokens", "examples"} <= set(result)
    assert result["prompt"] == PROMPT and result["completion"] == COMPLETION
    assert result["tokens"] and result["examples"]
    for position, token in enumerate(result["tokens"]):
        assert {"position", "token", "token_id", "logit", "prototypes", "examples"} <= set(token)
        assert token["position"] == position
        slices = np.array([p["slice"] for p in token["prototypes"]])
        assert abs(slices.sum() - token["logit"]) / np.abs(slices).sum() < 1e-4
        assert all({"id", "weight", "slice", "label"} <= set(p) and p["weight"] > 0 for p in token["prototypes"])
        for alternative in token["alternatives"]:
            alt = np.array(alternative["slices"])
            assert abs(alt.sum() - alternative["logit"]) / np.abs(alt).sum() < 1e-4
        for example in token["examples"]:
            assert {"doc_id", "source", "score", "snippet"} <= set(example)
    assert "".join(t["token"] for t in result["tokens"]) == COMPLETION


def test_planted_example_ranks_top3(planted, planted_corpus):
    bundle, index = planted
    result = attribute(bundle, index, PROMPT, COMPLETION, top=10)
    top3 = result.examples[:3]
    assert any(e.doc_id.startswith("canary-") for e in top3), [(e.doc_id, e.score) for e in result.examples]
    ids = {row["id"] for row in map(json.loads, planted_corpus.read_text().splitlines())}
    canary = next(e for e in top3 if e.doc_id.startswith("canary-"))
    assert canary.doc_id in ids and canary.source == "canary"  # the corpus row's id, unchanged
    assert canary.snippet == CANARY
    trigger = canary.snippet[canary.highlight_start : canary.highlight_end]
    assert trigger and trigger in CANARY[canary.char_offset :]
    assert [e.score for e in result.examples] == sorted((e.score for e in result.examples), reverse=True)


def test_planted_example_ranks_first_by_influence(planted_bundle, planted_corpus, tmp_path):
    copy = Path(shutil.copytree(planted_bundle, tmp_path / "influence"))
    build_influence(
        copy,
        planted_corpus,
        InfluenceArguments(rank=None, top_documents=None, curvature_tokens=None),
        show_progress=False,
    )
    result = attribute(load_bundle(copy), load_index(copy), PROMPT, COMPLETION, top=10, method="influence")
    assert result.method == "influence"
    assert result.examples[0].doc_id.startswith("canary-"), [(e.doc_id, e.score) for e in result.examples]
    best = result.examples[0]
    assert best.snippet == CANARY and best.snippet[best.highlight_start : best.highlight_end]
    assert [e.score for e in result.examples] == sorted((e.score for e in result.examples), reverse=True)


def test_scores_add_up_to_the_logit_and_spans_sum_tokens(planted):
    bundle, index = planted
    everything = 10**6
    result = attribute(bundle, index, PROMPT, COMPLETION, top=everything, span=(1, 4))
    for token, examples in zip(result.decomposition.tokens, result.token_examples, strict=True):
        if all(p.cosine > 0 for p in token.prototypes):  # then every slice finds neighbours to share it
            assert sum(e.score for e in examples) == pytest.approx(token.logit, rel=1e-5)
    per_doc: dict[str, float] = {}
    for examples in result.token_examples[1:4]:
        for e in examples:
            per_doc[e.doc_id] = per_doc.get(e.doc_id, 0.0) + e.score
    assert {e.doc_id: e.score for e in result.examples} == pytest.approx(per_doc, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="span 3:99"):
        attribute(bundle, index, PROMPT, COMPLETION, span=(3, 99))


def test_code_similarity_and_ranking_match_their_definitions(planted):
    """Neighbourhood shares use cos(query code, neighbour code) over sparse P-vectors, and the
    ranking sums credit per document with ties broken by training row: both checked against
    a direct computation, with a top that cuts through tied scores."""
    bundle, index = planted
    rng = np.random.default_rng(0)
    k = bundle.model.config.prototype_top_k
    P = index.num_prototypes
    for _ in range(5):
        ids = rng.choice(P, k, replace=False)
        cosines = rng.uniform(-0.2, 1.0, k)
        slices = rng.normal(size=k)
        credit = neighbourhood_credit(index, ids, slices, cosines)
        query = np.zeros(P)
        query[ids] = cosines
        expected = {}
        for j, s in zip(ids, slices, strict=True):
            sims = {}
            for row in index.neighbour_row[j][index.neighbour_row[j] >= 0]:
                code = np.zeros(P)
                code[index.positions["code_ids"][row]] = index.positions["code_cosine"][row]
                denominator = np.linalg.norm(code) * np.linalg.norm(query)
                sims[int(row)] = max(0.0, code @ query / denominator) if denominator > 0 else 0.0
            total = sum(sims.values())
            expected.update({(int(j), r): s * v / total for r, v in sims.items() if total > 0 and v > 0})
        got = {(int(p), int(r)): v for p, r, v in zip(credit.prototypes, credit.rows, credit.values, strict=True)}
        assert got.keys() == expected.keys()
        assert list(got.values()) == pytest.approx([expected[key] for key in got], rel=1e-9, abs=1e-12)

    # Ranking: equal credit on every document, so the order is by training row alone.
    rows = np.unique(index.neighbour_row[index.neighbour_row >= 0])
    flat = _Credit(rows, np.zeros(len(rows), dtype=np.int64), np.ones(len(rows)))
    totals = {}
    for r in rows:
        key = int(index.positions["doc_index"][r])
        totals[key] = totals.get(key, 0.0) + 1.0
    order = sorted(totals, key=lambda doc: (-totals[doc], doc))
    ranked = rank_examples(index, flat, top=7)
    assert [e.doc_index for e in ranked] == order[:7]
    assert [e.score for e in ranked] == [totals[doc] for doc in order[:7]]


def test_neighbourhoods_one_position_per_document_with_snippets(planted):
    bundle, index = planted
    assert index.usage_share.sum() == pytest.approx(1.0)
    assert index.promoted_token_ids.shape == (128, 10)
    for prototype in range(index.num_prototypes):
        neighbours = index.neighbourhood(prototype)
        assert len({n["doc_index"] for n in neighbours}) == len(neighbours)
        active = [n["cosine"] for n in neighbours if n["active"]]
        assert active == sorted(active, reverse=True)
    decoded = same = 0
    for row in range(len(index.snippets)):
        record = index.example(row)
        token = bundle.tokenizer.decode([record["token_id"]])
        if "\ufffd" not in token:  # byte-level tokens that split a character decode to U+FFFD
            decoded += 1
            same += record["snippet"][record["highlight_start"] : record["highlight_end"]] == token
    assert same == decoded > 0


def test_index_refuses_other_corpus_and_other_model(planted_bundle, planted_corpus, small_corpus, tmp_path):
    load_index(planted_bundle, corpus_fingerprint=load_corpus(planted_corpus).fingerprint)  # the right one loads
    with pytest.raises(PrototypeIndexError, match="built from corpus .* not this corpus"):
        load_index(planted_bundle, corpus_fingerprint=load_corpus(small_corpus).fingerprint)
    other = Path(shutil.copytree(planted_bundle, tmp_path / "other"))
    bundle = load_bundle(other)
    bundle.model.prototypes.values.mul_(1.01)  # other weights, same shapes
    write_bundle(other, bundle.model, bundle.tokenizer, bundle.training)  # leaves index/ in place
    with pytest.raises(PrototypeIndexError, match="built for model .* not this model"):
        load_index(other)
    with pytest.raises(PrototypeIndexError, match="built for model"):
        attribute(load_bundle(other), load_index(planted_bundle), PROMPT, COMPLETION)


def test_scores_do_not_depend_on_index_batch_size(planted_bundle, planted_corpus, tmp_path):
    indexes = []
    for batch_size in (1, 7):
        copy = unindexed_copy(planted_bundle, tmp_path / f"b{batch_size}")
        build_index(copy, planted_corpus, batch_size=batch_size, max_tokens=3000, dtype="float64", show_progress=False)
        indexes.append((load_bundle(copy), load_index(copy)))
    (bundle_a, a), (bundle_b, b) = indexes
    assert a.meta["sequences"] == b.meta["sequences"] == 47
    np.testing.assert_array_equal(a.usage_count, b.usage_count)

    def slots(index) -> np.ndarray:  # (P, M) each neighbour's global position, sorted per prototype
        rows = index.neighbour_row
        slot = index.positions["sequence"][rows] * 64 + index.positions["offset"][rows]
        return np.sort(np.where(rows >= 0, slot, -1), axis=1)

    np.testing.assert_array_equal(slots(a), slots(b))
    np.testing.assert_allclose(np.sort(a.cosine, axis=1), np.sort(b.cosine, axis=1), rtol=1e-12, atol=1e-12)
    scores = [
        {e.doc_id: e.score for e in attribute(bundle, index, PROMPT, COMPLETION, top=1000).examples}
        for bundle, index in indexes
    ]
    assert scores[0].keys() == scores[1].keys()
    assert scores[0] == pytest.approx(scores[1], rel=1e-12, abs=1e-12)


def test_index_is_written_atomically(planted_bundle, tmp_path):
    copy = unindexed_copy(planted_bundle, tmp_path / "copy")
    with pytest.raises(CorpusError, match="corpus not found"):
        build_index(copy, tmp_path / "moved.jsonl", show_progress=False)
    assert not index_dir(copy).exists() and not list(copy.glob(".index-*"))
    # A failed rebuild keeps the previous index intact.
    meta = (index_dir(planted_bundle) / "meta.json").read_text()
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": i, "text": "Too short.", "source": "x"} for i in "abc"])
    with pytest.raises(PrototypeIndexError, match="shorter than one sequence"):
        build_index(planted_bundle, short, show_progress=False)
    assert (index_dir(planted_bundle) / "meta.json").read_text() == meta
    assert not list(planted_bundle.glob(".index-*"))
    recorded = json.loads(meta)
    assert recorded["arguments"]["top_m"] == 32 and recorded["build_seconds"] > 0


def test_engine_caches_beside_the_shared_index(planted_bundle, planted):
    """What attribution derives from an index is built once per index object, also under
    concurrent requests, and the index itself (shared by the explorer's sessions) is never
    written to."""
    from concurrent.futures import ThreadPoolExecutor

    bundle, index = planted
    before = {name: id(value) for name, value in vars(index).items()}
    result = attribute(bundle, index, PROMPT, COMPLETION, top=3)
    assert {name: id(value) for name, value in vars(index).items()} == before
    assert result.measurement == "logit slice" and result.to_json()["measurement"] == "logit slice"
    fresh = load_index(planted_bundle)
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: neighbour_codes(fresh), range(8)))
    assert all(c is codes[0] for c in codes) and codes[0] is not neighbour_codes(index)


def test_decompose_text_generation_and_controls(planted):
    bundle, _ = planted
    whole = decompose(bundle, text=CANARY)
    assert whole.prompt + whole.completion == CANARY
    assert len(whole.tokens) == len(whole.prompt_ids) + len(whole.completion_ids) - 1
    generated = decompose(bundle, prompt=PROMPT, max_new_tokens=4)
    assert generated.generated and 1 <= len(generated.tokens) <= 4
    base = decompose(bundle, prompt=PROMPT, completion=COMPLETION)
    top = base.tokens[0].prototypes[0].id
    suppressed = decompose(bundle, prompt=PROMPT, completion=COMPLETION, controls=Controls(suppressed=[top]))
    assert all(top not in {p.id for p in t.prototypes} for t in suppressed.tokens)
    doubled = decompose(bundle, prompt=PROMPT, completion=COMPLETION, controls=Controls(gains={top: 2.0}))
    first = {p.id: p.slice for p in doubled.tokens[0].prototypes}
    assert first[top] == pytest.approx(2 * base.tokens[0].prototypes[0].slice, rel=1e-5)
    assert sum(first.values()) == pytest.approx(doubled.tokens[0].logit, rel=1e-4)
    for bad, match in [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt=PROMPT, completion=""), "no tokens"),
        (dict(text=CANARY, prompt=PROMPT), "not both"),
    ]:
        with pytest.raises(ValueError, match=match):
            decompose(bundle, **bad)


def test_cli_errors_are_one_line(planted_bundle, tiny_bundle, tmp_path, capsys):
    base = ["attribute", "--model", planted_bundle, "--prompt", PROMPT]
    code, _, err = run(["attribute", "--model", tiny_bundle, "--prompt", PROMPT], capsys)
    assert_one_line_error(code, err, "no index", "prism index --model")
    code, _, err = run(["attribute", "--model", planted_bundle, "--prompt", ""], capsys)
    assert_one_line_error(code, err, "prompt is empty")
    code, _, err = run([*base, "--completion", ""], capsys)
    assert_one_line_error(code, err, "completion has no tokens")
    code, _, err = run([*base, "--completion", " word" * 100], capsys)
    assert_one_line_error(code, err, "context")
    no_factors = Path(
        shutil.copytree(
            planted_bundle, tmp_path / "no-factors", ignore=shutil.ignore_patterns("influence.safetensors", ".index-*")
        )
    )
    code, _, err = run(
        ["attribute", "--model", no_factors, "--prompt", PROMPT, "--completion", COMPLETION, "--method", "influence"],
        capsys,
    )
    assert_one_line_error(code, err, "no influence factors", "prism index --model")
    code, _, err = run([*base, "--completion", "\udcff\udcfe"], capsys)  # undecodable bytes on the command line
    assert_one_line_error(code, err, "not valid text")
    code, _, err = run(["index", "--model", tiny_bundle, "--corpus", tmp_path / "gone.jsonl"], capsys)
    assert_one_line_error(code, err, "corpus not found")
    assert not index_dir(tiny_bundle).exists()
    code, out, err = run([*base, "--completion", COMPLETION, "--top", "2"], capsys)
    assert code == 0 and "examples over the whole completion" in out and "canary-" in out, err


@pytest.mark.parametrize("argv", [["index", "--help"], ["attribute", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out
