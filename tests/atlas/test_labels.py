"""Labels and the atlas: computed offline through `prism index`, deterministic, numbers and
one-source neighbourhoods labelled as such, UMAP coordinates cached and reused."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import core.atlas.layout
from core.atlas.labels import (
    CATEGORIES,
    LABELS_FILE,
    SOURCE_TOPICS,
    build_labels,
    load_labels,
    quality_summary,
    token_form,
)
from core.atlas.layout import ATLAS_FILE, build_atlas, load_atlas
from core.cli import main
from core.index.format import index_dir, load_index


class _NetworkAttempt(AssertionError):
    pass


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_bundle, small_corpus) -> tuple[Path, list[str]]:
    """A copy of the tiny bundle indexed, labelled and mapped by `prism index` with every
    socket call refused; returns the bundle and the network calls attempted."""
    bundle = Path(
        shutil.copytree(
            tiny_bundle,
            tmp_path_factory.mktemp("labelled") / "tiny",
            ignore=shutil.ignore_patterns("index", ".index-*"),
        )
    )
    attempts: list[str] = []

    def refuse(name):
        def guard(*args, **kwargs):
            attempts.append(f"{name}{args[1:] if name.startswith('socket.') else args}")
            raise _NetworkAttempt(f"network access attempted: {name}")

        return guard

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse("socket.connect"))
        mp.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
        mp.setattr(socket, "create_connection", refuse("create_connection"))
        mp.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
        code = main(["index", "--model", str(bundle), "--corpus", str(small_corpus), "--quiet"])
    assert code == 0
    return bundle, attempts


def test_index_labels_and_maps_without_network(labelled):
    bundle, attempts = labelled
    assert attempts == []
    folder = index_dir(bundle)
    meta = json.loads((folder / "meta.json").read_text())
    assert {LABELS_FILE, ATLAS_FILE} <= set(meta["files"])
    labels = load_labels(bundle)
    index = load_index(bundle)
    assert [label.id for label in labels] == list(range(index.num_prototypes))
    for label in labels:
        assert label.category in CATEGORIES, label
        assert label.role and label.description
        assert 0 <= label.confidence <= 1 and 0 < label.purity <= 1
        assert -1 <= label.coherence <= 1
        assert sum(label.source_mix.values()) == pytest.approx(1, abs=1e-3)
        assert index.label(label.id) == f"{label.category}: {label.role}"
    coords = load_atlas(bundle)
    assert coords.shape == (index.num_prototypes, 2) and np.isfinite(coords).all()


def test_labels_are_deterministic(labelled):
    bundle, _ = labelled
    before = [label.to_json() for label in load_labels(bundle)]
    again = [label.to_json() for label in build_labels(bundle, progress=False)]
    assert again == before
    assert [label.to_json() for label in load_labels(bundle)] == before


@pytest.mark.parametrize(
    ("text", "start", "end", "form"),
    [
        ("released in 1999 by", 12, 16, "number"),
        ("on 3 March the", 5, 10, "number"),
        ("the plants grow", 3, 6, "subword"),  # " pl" of " plants": the next token continues the word
        ("said the man", 4, 8, "function"),
        ("so said Hamlet to", 7, 14, "name"),
        ("Hamlet. Go on", 0, 6, "word"),  # capitalised at the start of a text: not evidence of a name
        ("KING OF FRANCE", 7, 14, "name"),  # words in capitals
        ("end.\n\nNext", 3, 4, "punctuation"),
        ("end.\n\nNext", 4, 6, "punctuation"),
        ("a green tree", 1, 7, "word"),
        ("I don't know", 1, 5, "function"),  # the auxiliary of a negated contraction
        ("you may go", 3, 7, "function"),  # lower-case "may" is the verb, not the month
    ],
)
def test_token_form(text, start, end, form):
    assert token_form(text, start, end)[0] == form


def _rows_where(index, keep) -> list[int]:
    rows = []
    for row, snippet in enumerate(index.snippets):
        source = index.documents[int(index.positions["document"][row])]["source"]
        if keep(token_form(snippet["snippet"], snippet["start"], snippet["end"])[0], source):
            rows.append(row)
    return rows


def _plant_number_positions(bundle: Path, corpus: Path, count: int) -> list[int]:
    """Append ``count`` training positions whose token ends a number (a year, a time, a
    version) to the bundle's positions table, the way the index pass records positions, and
    return their rows. The small corpus has such numbers, but the tiny model's index holds
    only a few of them; planting keeps the test independent of what the tiny model learnt."""
    from core.bundle import load_bundle
    from core.data.corpus import load_corpus
    from core.index.format import SNIPPET_AFTER, SNIPPET_BEFORE

    tokenizer = load_bundle(bundle).tokenizer
    folder = index_dir(bundle)
    positions = load_file(folder / "positions.safetensors")
    documents = [json.loads(line) for line in (folder / "documents.jsonl").read_text().splitlines()]
    snippets = [json.loads(line) for line in (folder / "positions.jsonl").read_text().splitlines()]
    new = {name: [] for name in positions}
    train = load_corpus(corpus).train
    for doc_index, row in enumerate(train):
        text = row["text"]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        for t in range(min(len(spans) - 1, 60)):
            begin, end = spans[t]
            word_start = begin + len(text[begin:end]) - len(text[begin:end].lstrip())
            standalone = not text[word_start - 1 : word_start].isalnum() and not text[end : end + 1].isalnum()
            if t == 0 or not text[begin:end].strip().isdigit() or not standalone:
                continue
            lo, hi = max(0, begin - SNIPPET_BEFORE), min(len(text), end + SNIPPET_AFTER)
            snippets.append({"snippet": text[lo:hi], "start": begin - lo, "end": end - lo})
            documents.append({"doc_index": doc_index, "id": row["id"], "source": row["source"], "chars": len(text)})
            values = {
                "document": len(documents) - 1,
                "doc_index": doc_index,
                "char_offset": begin,
                "token_id": enc["input_ids"][t],
                "next_token_id": enc["input_ids"][t + 1],
                "sequence": 0,
                "offset": t,
            }
            for name in new:
                shape = positions[name].shape[1:]
                new[name].append(np.full(shape, values.get(name, 0), dtype=positions[name].dtype))
            break  # one position per document, as in the index
        if len(snippets) - len(positions["document"]) == count:
            break
    first = len(positions["document"])
    assert len(snippets) - first == count, "the small corpus has numbers in at least this many documents"
    save_file(
        {name: np.concatenate([positions[name], np.stack(new[name])]) for name in positions},
        folder / "positions.safetensors",
    )
    (folder / "documents.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents))
    (folder / "positions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in snippets))
    return list(range(first, first + count))


ONE_SOURCE = {1: ("wordnet", "word"), 2: ("debian", "word"), 3: ("debian", "punctuation")}


@pytest.fixture(scope="module")
def rewired(labelled, small_corpus, tmp_path_factory):
    """A labelled copy in which prototype 0's neighbourhood is all numbers (real training
    positions, planted) and prototypes 1-3 each draw on one source (ONE_SOURCE): their
    labels from one labelling run, and the planted rows."""
    copy = Path(shutil.copytree(labelled[0], tmp_path_factory.mktemp("rewired") / "tiny"))
    number_rows = _plant_number_positions(copy, small_corpus, 16)
    index = load_index(copy)
    path = index_dir(copy) / "neighbourhoods.safetensors"
    arrays = load_file(path)
    M = arrays["neighbour_row"].shape[1]
    picks = {0: number_rows}
    for prototype, (source, form) in ONE_SOURCE.items():
        picks[prototype] = _rows_where(index, lambda f, s, source=source, form=form: s == source and f == form)
        assert len(picks[prototype]) >= 8, (source, form)
    for prototype, rows in picks.items():
        chosen = np.full(M, -1, dtype=np.int32)
        chosen[: min(M, len(rows))] = rows[:M]
        arrays["neighbour_row"][prototype] = chosen
        arrays["cosine"][prototype] = np.where(chosen >= 0, 0.5, 0.0)
    save_file(arrays, path)
    return copy, build_labels(copy, progress=False), number_rows


def test_numbers_neighbourhood_is_labelled_numbers(rewired):
    copy, labels, rows = rewired
    index = load_index(copy)
    assert all(token_form(s["snippet"], s["start"], s["end"])[0] == "number" for s in (index.snippets[r] for r in rows))
    label = labels[0]
    assert label.category == "numbers & dates"
    assert label.confidence == 1.0
    assert any(c.isdigit() for c in label.role), label.role
    assert index.label(0).startswith("numbers & dates: ")


@pytest.mark.parametrize("prototype", sorted(ONE_SOURCE))
def test_one_source_neighbourhood_carries_its_topic(rewired, prototype):
    _, labels, _ = rewired
    source, form = ONE_SOURCE[prototype]
    label = labels[prototype]
    topic = SOURCE_TOPICS[source]
    assert label.purity == 1.0 and label.source_mix == {source: 1.0}
    if form == "word":  # content words: the topic is the category
        assert label.category == topic and label.confidence == 1.0
    else:  # a structural category, placed in its topic by the role
        assert label.category == "punctuation & layout" and label.role.endswith(f"in {topic}")
    assert source in label.description


def test_atlas_is_cached_and_reused(labelled, tmp_path, monkeypatch):
    bundle = Path(shutil.copytree(labelled[0], tmp_path / "atlas"))
    path = index_dir(bundle) / ATLAS_FILE
    calls = []
    compute = core.atlas.layout.umap_coordinates

    def spy(*args, **kwargs):
        calls.append(args[1:])
        return compute(*args, **kwargs)

    monkeypatch.setattr(core.atlas.layout, "umap_coordinates", spy)
    cached = load_atlas(bundle)
    stamp = path.stat().st_mtime_ns
    again = build_atlas(bundle)  # the defaults `prism index` used: served from the file
    assert calls == [] and path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again, cached)

    other = build_atlas(bundle, min_dist=0.5)  # other arguments: recomputed and stored with them
    assert calls == [(15, 0.5, 0)]
    assert json.loads(path.read_text())["arguments"]["min_dist"] == 0.5
    assert build_atlas(bundle, min_dist=0.5) is not None and len(calls) == 1
    assert not np.allclose(other, cached)

    record = json.loads(path.read_text())  # weights that changed since: stale, recomputed
    path.write_text(json.dumps({**record, "model_fingerprint": "0" * 16}))
    assert load_atlas(bundle) is None
    fresh = build_atlas(bundle)
    assert len(calls) == 2
    np.testing.assert_allclose(fresh, cached, atol=1e-4)  # seeded UMAP: the same map again


def test_quality_summary_and_missing_labels(labelled, tmp_path):
    bundle, _ = labelled
    labels = load_labels(bundle)
    summary = quality_summary(labels)
    assert summary["prototypes"] == len(labels)
    assert sum(summary["categories"].values()) == pytest.approx(1, abs=1e-3)
    assert summary["dead_share"] == pytest.approx(sum(label.dead for label in labels) / len(labels))
    bare = Path(shutil.copytree(bundle, tmp_path / "bare"))
    (index_dir(bare) / LABELS_FILE).unlink()
    (index_dir(bare) / ATLAS_FILE).unlink()
    assert load_labels(bare) is None and load_atlas(bare) is None
    assert load_index(bare).label(0) is None


def test_cli_label_errors_are_one_line(tiny_bundle, tmp_path, capsys):
    bare = Path(shutil.copytree(tiny_bundle, tmp_path / "bare", ignore=shutil.ignore_patterns("index", ".index-*")))
    code = main(["label", "--model", str(bare)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("prism: error: "), err
    assert "prism index" in lines[0]
