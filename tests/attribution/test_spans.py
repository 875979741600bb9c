"""Exact-span attribution: suffix-array matches equal a brute-force search, the planted sentence
found verbatim, the --json contract, and clear refusals of a missing or stale span index."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.attribution.engine import METHODS, attribute
from core.attribution.spans import MEASUREMENT, MIN_SPAN, SpanCredit, rank_spans
from core.attribution.spans_index import _GATHER_BELOW, SPANS_FILE, build_spans, load_spans
from core.bundle import load_bundle
from core.cli import build_parser
from core.errors import ArgumentError, PrototypeIndexError
from core.index.format import index_dir, load_index
from core.store import read_safetensors, write_safetensors
from tests.helpers import CANARY, COMPLETION, PROMPT, assert_one_line_error, run, unindexed_copy


@pytest.fixture(scope="module")
def spans_bundle(tmp_path_factory, planted_bundle, planted_corpus) -> Path:
    """A copy of the planted bundle indexed by `prism index` (span index included, influence not)."""
    bundle = unindexed_copy(planted_bundle, tmp_path_factory.mktemp("spans") / "bundle")
    code = run_index(bundle, planted_corpus)
    assert code == 0
    return bundle


def run_index(bundle: Path, corpus: Path, *extra: str) -> int:
    from core.cli import main

    return main(["index", "--model", str(bundle), "--corpus", str(corpus), "--no-influence", "--quiet", *extra])


@pytest.fixture(scope="module")
def documents(planted_corpus, spans_bundle) -> list[list[int]]:
    """The training documents' tokens, tokenised here independently of the span index."""
    from core.data.corpus import load_corpus

    tokenizer = load_bundle(spans_bundle).tokenizer
    train = load_corpus(planted_corpus).train
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in train["text"]]


def brute_force(documents: list[list[int]], pattern: list[int]) -> list[int]:
    """The documents that contain ``pattern`` (every window compared)."""
    n = len(pattern)
    return [d for d, doc in enumerate(documents) if any(doc[i : i + n] == pattern for i in range(len(doc) - n + 1))]


def longest_in(doc: list[int], sequence: list[int], start: int) -> int:
    """The longest prefix of ``sequence[start:]`` that occurs in ``doc`` (brute force)."""
    best = 0
    for i in range(len(doc)):
        k = 0
        while start + k < len(sequence) and i + k < len(doc) and doc[i + k] == sequence[start + k]:
            k += 1
        best = max(best, k)
    return best


def test_suffix_array_matches_are_exact(spans_bundle, documents):
    spans = load_spans(spans_bundle)
    assert spans.num_documents == len(documents)
    assert len(spans.suffix_array) > _GATHER_BELOW  # the widest ranges take the bisecting path
    assert all(spans.document_tokens(d).tolist() == doc for d, doc in enumerate(documents))
    rng = random.Random(0)
    patterns = []
    for _ in range(300):  # spans cut from the documents, short ones shared by many
        doc = rng.choice([d for d in documents if d])
        n = rng.randint(1, min(12, len(doc)))
        i = rng.randrange(len(doc) - n + 1)
        patterns.append(doc[i : i + n])
    vocab = spans.separator
    patterns += [[rng.randrange(vocab) for _ in range(rng.randint(1, 4))] for _ in range(100)]  # mostly absent
    patterns += [pattern[:-1] + [documents[0][0]] for pattern in patterns[:50] if len(pattern) > 1]  # near misses
    found_some = 0
    for pattern in patterns:
        expected = brute_force(documents, pattern)
        assert spans.documents_containing(pattern).tolist() == expected, pattern
        for position in spans.find(pattern).tolist():  # every occurrence is the pattern, inside one document
            assert spans.tokens[position : position + len(pattern)].tolist() == pattern
        found_some += bool(expected)
    assert found_some > 300


def test_longest_matches_equal_brute_force(spans_bundle, documents):
    spans = load_spans(spans_bundle)
    tokenizer = load_bundle(spans_bundle).tokenizer
    sequence = tokenizer(PROMPT + " and then the" + COMPLETION, add_special_tokens=False)["input_ids"]
    reach = 3
    for min_length in (1, MIN_SPAN):
        matches = spans.longest_matches(sequence, min_length, reach)
        got = {(s, d): (n, o) for s, n, d, o in zip(*(x.tolist() for x in vars(matches).values()), strict=True)}
        expected = {}
        for start in range(len(sequence)):
            for d, doc in enumerate(documents):
                n = longest_in(doc, sequence, start)
                if n >= min_length and start + n > reach:
                    expected[(start, d)] = n
        assert {key: n for key, (n, _) in got.items()} == expected
        for (start, d), (n, occurrence) in got.items():  # the first occurrence in the document
            local = occurrence - int(spans.doc_starts[d])
            doc = documents[d]
            assert doc[local : local + n] == sequence[start : start + n]
            assert not any(doc[i : i + n] == sequence[start : start + n] for i in range(local))


def test_planted_sentence_ranks_first(spans_bundle, planted_corpus):
    bundle, index = load_bundle(spans_bundle), load_index(spans_bundle)
    result = attribute(bundle, index, PROMPT, COMPLETION, top=10, method="spans")
    assert result.method == "spans" and result.measurement == MEASUREMENT
    n = len(result.decomposition.prompt_ids) + len(result.decomposition.completion_ids)
    top8 = result.examples[:8]
    assert all(e.doc_id.startswith("canary-") for e in top8), [(e.doc_id, e.score) for e in result.examples]
    ids = {row["id"] for row in map(json.loads, planted_corpus.read_text().splitlines())}
    for e in top8:
        assert e.doc_id in ids and e.source == "canary" and e.prototype == -1
        assert e.score == n  # the whole prompt + completion, verbatim
        assert e.positions == len(result.decomposition.tokens)  # every completion token covered
        assert e.snippet == CANARY and e.snippet[e.highlight_start : e.highlight_end].strip() == CANARY.strip()
    assert [e.doc_index for e in top8] == sorted(e.doc_index for e in top8)  # ties: the training split's order
    assert all(e.score < n for e in result.examples[8:])
    for examples in result.token_examples:
        assert examples[0].doc_id.startswith("canary-") and examples[0].score == n
    # A span of the completion: the same canaries, the same longest span.
    part = attribute(bundle, index, PROMPT, COMPLETION, top=3, method="spans", span=(2, 4))
    assert [e.doc_id for e in part.examples] == [e.doc_id for e in top8[:3]]


def test_min_span_and_ranking(spans_bundle):
    bundle, index = load_bundle(spans_bundle), load_index(spans_bundle)
    completion = " the violet lamp of the old house."
    loose = attribute(bundle, index, "Under", completion, top=10**6, method="spans", min_span=1)
    strict = attribute(bundle, index, "Under", completion, top=10**6, method="spans", min_span=3)
    assert {e.doc_id for e in strict.examples} <= {e.doc_id for e in loose.examples}
    assert all(e.score >= 3 for e in strict.examples) and all(e.score >= 1 for e in loose.examples)
    for examples in loose.token_examples:
        assert [(-e.score, e.doc_index) for e in examples] == sorted((-e.score, e.doc_index) for e in examples)
        for e in examples:
            assert e.snippet[e.highlight_start : e.highlight_end]
    with pytest.raises(ArgumentError, match="min_span"):
        attribute(bundle, index, "Under", completion, method="spans", min_span=0)
    # Overall: the longest span, then the tokens covered, then the training split's order.
    doc, length, token = (np.array(x, dtype=np.int64) for x in ([4, 2, 2, 7, 9], [5, 5, 3, 5, 1], [0, 0, 1, 1, 2]))
    credit = SpanCredit(doc, length, token, np.zeros(5, np.int64), np.arange(5))
    assert [(r.doc, r.score, r.positions) for r in rank_spans(credit, 10)] == [
        (2, 5, 2),
        (4, 5, 1),
        (7, 5, 1),
        (9, 1, 1),
    ]


def test_json_contract_and_index_options(spans_bundle, capsys):
    assert "spans" in METHODS
    meta = json.loads((index_dir(spans_bundle) / "meta.json").read_text())
    assert meta["files"][SPANS_FILE] == (index_dir(spans_bundle) / SPANS_FILE).stat().st_size
    assert meta["spans"]["documents"] > 0
    args = ["attribute", "--model", spans_bundle, "--prompt", PROMPT, "--completion", COMPLETION]
    code, out, err = run([*args, "--method", "spans", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    code, out, err = run([*args, "--json"], capsys)
    assert code == 0, err
    assert set(result) == set(json.loads(out))  # the same keys as the neighbourhood method
    assert result["method"] == "spans" and result["measurement"] == MEASUREMENT
    assert result["examples"][0]["doc_id"].startswith("canary-")
    for token in result["tokens"]:
        for example in token["examples"]:
            assert {"doc_id", "source", "score", "snippet", "highlight_start", "highlight_end"} <= set(example)
    code, out, err = run([*args, "--method", "spans"], capsys)
    assert code == 0 and "examples over the whole completion (spans)" in out, err
    parser = build_parser()
    assert parser.parse_args(["index", "--model", "m", "--corpus", "c", "--no-spans"]).no_spans
    assert not parser.parse_args(["index", "--model", "m", "--corpus", "c"]).no_spans


def test_missing_or_stale_span_index_is_refused(spans_bundle, planted_corpus, small_corpus, tmp_path, capsys):
    copy = Path(shutil.copytree(spans_bundle, tmp_path / "copy"))
    path = index_dir(copy) / SPANS_FILE
    arrays, header = read_safetensors(path)
    # Built for other weights.
    meta = json.loads(header["meta"])
    write_safetensors(path, arrays, metadata={"meta": json.dumps({**meta, "model_fingerprint": "0" * 16})})
    with pytest.raises(PrototypeIndexError, match=r"built for model 0{16}, not this model .*`prism index --model "):
        load_spans(copy)
    # From another corpus than the index.
    write_safetensors(path, arrays, metadata={"meta": json.dumps({**meta, "corpus_fingerprint": "other"})})
    with pytest.raises(PrototypeIndexError, match="another corpus than the index; rebuild both with `prism index"):
        load_spans(copy)
    with pytest.raises(PrototypeIndexError, match="another corpus than .*`prism index --model "):
        build_spans(copy, small_corpus, show_progress=False)
    # Cut short.
    short = {**arrays, "suffix_array": arrays["suffix_array"][:-1]}
    write_safetensors(path, short, metadata={"meta": json.dumps(meta)})
    with pytest.raises(PrototypeIndexError, match="do not fit together; rebuild it with `prism index --model "):
        load_spans(copy)
    # Not a safetensors file.
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(PrototypeIndexError, match="not readable.*`prism index --model "):
        load_spans(copy)
    # Missing: the library and the CLI name the rebuild command.
    path.unlink()
    with pytest.raises(
        PrototypeIndexError, match=re.escape(f"has no span index; build it with `prism index --model {copy}")
    ):
        attribute(load_bundle(copy), load_index(copy), PROMPT, COMPLETION, method="spans")
    args = ["attribute", "--model", copy, "--prompt", PROMPT, "--completion", COMPLETION, "--method", "spans"]
    capsys.readouterr()  # the corpus reading bars of the builds above
    code, _, err = run(args, capsys)
    assert_one_line_error(code, err, "no span index", "prism index --model")
    # Rebuilt: usable again.
    build_spans(copy, planted_corpus, show_progress=False)
    assert load_spans(copy).num_documents == load_spans(spans_bundle).num_documents
