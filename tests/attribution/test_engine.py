"""Attribution: exact slices in the JSON, a planted example found, the engine's caches beside
the shared index, decomposition under controls, one-line CLI errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.attribution.decompose import decompose
from core.attribution.engine import attribute, neighbour_codes
from core.attribution.influence import InfluenceArguments, build_influence
from core.attribution.neighbourhood import Credit as _Credit
from core.attribution.neighbourhood import neighbourhood_credit, rank_examples
from core.bundle import load_bundle
from core.cli import main
from core.control.controls import Controls
from core.index.format import index_dir, load_index
from tests.helpers import CANARY, COMPLETION, PROMPT, assert_one_line_error, run


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
    relative = [e.relative for e in result.examples]  # the default ranking: score / ||g_D||_A
    assert relative == sorted(relative, reverse=True)


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


def test_ranking_one_score_per_document_skips_the_sums_and_ranks_the_same():
    """rank_groups(distinct=True) on one entry per document gives the summing path's ranking:
    the same documents, totals, ties broken by id (values drawn with many ties), entries."""
    from core.attribution.ranking import rank_groups

    rng = np.random.default_rng(0)
    for _ in range(20):
        groups = rng.choice(500, size=int(rng.integers(1, 300)), replace=False)  # any order
        values = rng.integers(-3, 4, size=len(groups)).astype(np.float64)  # many ties
        top = int(rng.integers(1, 40))
        for tiebreak in (None, rng.permutation(len(groups))):
            summed = rank_groups(groups, values, top, tiebreak=tiebreak, size=500)
            direct = rank_groups(groups, values, top, tiebreak=tiebreak, distinct=True)
            for field in ("groups", "totals", "entries", "rank", "values"):
                np.testing.assert_array_equal(getattr(direct, field), getattr(summed, field))
            key = groups if tiebreak is None else tiebreak
            expected = sorted(range(len(groups)), key=lambda i: (-values[i], key[i]))[:top]
            assert direct.groups.tolist() == groups[expected].tolist()
