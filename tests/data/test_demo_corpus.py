"""Tests of the demo corpus builder's pure functions (no network, no apt)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from core.data import demo as dc


def test_clean_text_line_endings_trailing_space_and_blank_lines() -> None:
    raw = "\n\nfirst line   \r\nsecond\t \r\rthird\n\n\n\n\nfourth  \n\n"
    assert dc.clean_text(raw) == "first line\nsecond\n\nthird\n\nfourth"


def test_clean_text_control_characters_overstrike_and_escapes() -> None:
    raw = "bell\x07 here, \x1b[1mbold\x1b[0m, _\x08u_\x08n, B\x08Bo\x08ox\x00\ttab"
    assert dc.clean_text(raw) == "bell here, bold, un, Box\ttab"


def test_clean_text_nfc_and_bom() -> None:
    decomposed = "\ufeffcafe\u0301"  # e + combining acute, with a byte order mark
    cleaned = dc.clean_text(decomposed)
    assert cleaned == "caf\u00e9"
    assert len(cleaned) == 4


def test_fix_mojibake_single_and_double_encoding() -> None:
    assert dc.fix_mojibake("fine of \u00c2\u00a35") == "fine of \u00a35"
    assert dc.fix_mojibake("caf\u00c3\u00a9") == "caf\u00e9"
    # "’" encoded to UTF-8 twice, as in fortune-mod's law file.
    assert dc.fix_mojibake("Here\u00c3\u00a2\u00c2\u0080\u00c2\u0099s") == "Here\u2019s"
    # Real Latin-1 text that is not valid UTF-8 is left alone.
    assert dc.fix_mojibake("na\u00efve caf\u00e9 \u00e9\u00ab") == "na\u00efve caf\u00e9 \u00e9\u00ab"
    assert dc.clean_text("don\u00e2\u0080\u0099t") == "don\u2019t"


def test_clean_text_keeps_indentation_of_first_line() -> None:
    assert dc.clean_text("\n\tindented quote\n\t\t-- Someone\n") == "\tindented quote\n\t\t-- Someone"


def test_clean_text_whitespace_only_is_empty() -> None:
    assert dc.clean_text(" \n\t\n \x00 \n") == ""


def _docs(source: str, n: int, size: int = 10) -> list:
    return [dc.Document(f"{source}/{i:05d}", "x" * size, source) for i in range(n)]


def test_split_is_deterministic_and_by_id() -> None:
    docs = _docs("a", 3000)
    train1, val1 = dc.split_documents(docs)
    train2, val2 = dc.split_documents(list(reversed(docs)))
    assert {d.id for d in val1} == {d.id for d in val2}
    assert {d.id for d in train1} | {d.id for d in val1} == {d.id for d in docs}
    assert not {d.id for d in train1} & {d.id for d in val1}
    # Order within each split follows the input.
    assert [d.id for d in val1] == sorted(d.id for d in val1)


def test_split_fraction_near_target() -> None:
    big = _docs("big", 50_000)
    _, val = dc.split_documents(big)
    assert 0.017 < len(val) / len(big) < 0.023  # 2% for a large source
    small = _docs("small", 2000)
    _, val_small = dc.split_documents(small)
    # Small sources get up to 7% so they still have a usable number held out.
    assert 110 < len(val_small) < 170


def test_validation_fraction_for_bounds() -> None:
    assert dc.validation_fraction_for(1_000_000) == pytest.approx(0.02)
    assert dc.validation_fraction_for(4000) == pytest.approx(0.05)
    assert dc.validation_fraction_for(8000) == pytest.approx(0.025)
    assert dc.validation_fraction_for(10) == pytest.approx(0.07)


def test_is_validation_matches_hash() -> None:
    doc_id = "shakespeare/hamlet/0007"
    h = dc.id_hash_fraction(doc_id)
    assert 0.0 <= h < 1.0
    assert dc.is_validation(doc_id, h + 1e-9)
    assert not dc.is_validation(doc_id, h)


def test_subsample_to_budget_is_seeded_and_stable() -> None:
    docs = _docs("s", 1000, size=100)
    kept = dc.subsample_to_budget(docs, 30_000, seed=0)
    assert sum(len(d.text) for d in kept) <= 30_000
    assert len(kept) == 300
    assert kept == dc.subsample_to_budget(docs, 30_000, seed=0)
    assert [d.id for d in kept] == sorted(d.id for d in kept)  # original order kept
    other = dc.subsample_to_budget(docs, 30_000, seed=1)
    assert {d.id for d in other} != {d.id for d in kept}
    # Removing unselected documents does not change the selection.
    kept_ids = {d.id for d in kept}
    fewer = [d for i, d in enumerate(docs) if d.id in kept_ids or i % 2]
    assert {d.id for d in dc.subsample_to_budget(fewer, 30_000, seed=0)} == kept_ids
    assert dc.subsample_to_budget(docs, None, seed=0) == docs


GUTENBERG_SAMPLE = """The Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>

HAMLET

ACT I.

Ber.
Who's there?

End of the Project Gutenberg EBook of Hamlet

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

***** This file should be named 1524.txt *****
"""


def test_strip_gutenberg_boilerplate() -> None:
    body = dc.clean_text(dc.strip_gutenberg_boilerplate(GUTENBERG_SAMPLE))
    assert body == "HAMLET\n\nACT I.\n\nBer.\nWho's there?"


def test_strip_gutenberg_boilerplate_leaves_plain_text() -> None:
    text = "HAMLET\n\nACT I.\n\nBer.\nWho's there?\n"
    assert dc.strip_gutenberg_boilerplate(text) == text


def test_scene_headings() -> None:
    assert dc.is_scene_heading("ACT I.")
    assert dc.is_scene_heading("Scene II. Elsinore. A room in the castle.")
    assert dc.is_scene_heading("SCENE 3. Venice. A street")
    assert dc.is_scene_heading("ACT FIFTH. SCENE I.")
    assert dc.is_scene_heading("PROLOGUE.")
    assert dc.is_scene_heading("XVII")
    assert not dc.is_scene_heading("SCENE: Britain; Rome.")
    assert not dc.is_scene_heading("Ber.\nWho's there?")
    assert not dc.is_scene_heading("KING.\nAct well your part.")


def _speech(speaker: str, n_lines: int) -> str:
    return speaker + ".\n" + "\n".join(f"Line {i} of a speech by {speaker.lower()}, in verse." for i in range(n_lines))


def test_split_play_at_speech_and_scene_boundaries() -> None:
    speeches = [_speech("HAMLET", 6), _speech("HORATIO", 6)] * 6
    play = "\n\n".join(
        ["HAMLET\n\nby William Shakespeare", "ACT I.", "SCENE I. Elsinore.", "[Enter Hamlet.]"]
        + speeches
        + ["SCENE II. A room.", "[Enter Horatio.]"]
        + speeches[:4]
    )
    chunks = dc.split_play(play, min_chars=300, max_chars=1000)
    assert all(len(c) <= 1000 + 300 for c in chunks)
    assert all(len(c) >= 300 for c in chunks)
    # No chunk starts or ends in the middle of a speech: every paragraph survives whole.
    paragraphs = [p for c in chunks for p in c.split("\n\n")]
    assert paragraphs == play.split("\n\n")
    # Headings and [Enter ...] stay with what follows; a new scene starts a new chunk.
    assert not any(c.endswith(("ACT I.", "[Enter Hamlet.]", "[Enter Horatio.]")) for c in chunks)
    assert sum(c.startswith("SCENE II. A room.") for c in chunks) == 1
    # Speaker names are kept as they appear.
    assert chunks[1].count("HAMLET.\n") + chunks[1].count("HORATIO.\n") >= 1


def test_split_play_cuts_overlong_speech_at_lines() -> None:
    text = _speech("LUCRECE", 200)
    chunks = dc.split_play(text, min_chars=300, max_chars=2000)
    assert len(chunks) > 3
    assert all(len(c) <= 2000 for c in chunks)
    assert "\n".join(chunks) == text


def test_split_play_sonnets_one_per_chunk() -> None:
    sonnet = "\n".join(["Shall I compare thee to a summer's day, and so on and so forth."] * 14)
    text = "THE SONNETS\nby William Shakespeare\n\nI\n\n" + sonnet + "\n\nII\n\n" + sonnet + "\n\nIII\n\n" + sonnet
    chunks = dc.split_play(text)
    assert len(chunks) == 3
    assert chunks[1].startswith("II\n\nShall I compare")
    assert chunks[2].startswith("III\n\n")


def test_shakespeare_work_names_and_documents() -> None:
    assert dc.shakespeare_work_name("hamlet_gut.txt") == "hamlet"
    assert dc.shakespeare_work_name("hamlet_gut_f.txt") is None  # First Folio duplicate
    assert dc.shakespeare_work_name("tragedy_of_titus_andronicus_gut.txt") == "titus_andronicus"
    assert dc.shakespeare_work_name("metadata.txt") is None
    docs = dc.shakespeare_documents("hamlet", GUTENBERG_SAMPLE)
    assert [d.id for d in docs] == ["shakespeare/hamlet/0000"]
    assert docs[0].text.startswith("HAMLET") and "Gutenberg" not in docs[0].text


WORDNET_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"


WORDNET_NOUN = (
    "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ 02083346 n 0000 @ 01317541 n 0000 "
    "#m 02083346 n 0000 | a member of the genus Canis (probably descended from the common wolf) that has "
    'been domesticated by man since prehistoric times; occurs in many breeds; "the dog barked all night"  \n'
)


WORDNET_VERB = (
    "01168468 34 v 04 eat 0 feed 0 consume 0 devour 0 003 @ 01157517 v 0000 + 00837675 n 0101 "
    "$ 01166351 v 0000 02 + 08 00 + 11 00 | take in food; used of animals only; \"This dog doesn't eat certain "
    'kinds of meat"  \n'
)


WORDNET_ADJ = (
    "00001740 00 a 01 able 0 005 = 05207437 n 0000 = 05624254 n 0000 + 05624254 n 0101 ! 00002098 a 0101 "
    '+ 05207437 n 0101 | (usually followed by `to\') having the necessary means or skill; "able to swim"  \n'
)


WORDNET_SATELLITE = "00004413 00 s 02 afraid(p) 0 scared 0 001 & 00003000 a 0000 | filled with fear  \n"


def test_parse_wordnet_header_and_blank_lines() -> None:
    assert dc.parse_wordnet_line(WORDNET_HEADER) is None
    assert dc.parse_wordnet_line("\n") is None


def test_parse_wordnet_noun_line() -> None:
    synset = dc.parse_wordnet_line(WORDNET_NOUN)
    assert synset is not None
    assert synset.offset == "02084071"
    assert synset.ss_type == "n"
    assert synset.words == ("dog", "domestic dog", "Canis familiaris")
    assert synset.gloss.startswith("a member of the genus Canis")
    assert synset.gloss.endswith('"the dog barked all night"')


def test_parse_wordnet_verb_with_frames_and_hex_count() -> None:
    synset = dc.parse_wordnet_line(WORDNET_VERB)
    assert synset is not None
    assert synset.words == ("eat", "feed", "consume", "devour")
    assert synset.gloss == 'take in food; used of animals only; "This dog doesn\'t eat certain kinds of meat"'
    # w_cnt is hexadecimal: 0a words.
    line = "00000001 00 n 0a " + " ".join(f"w{i} 0" for i in range(10)) + " 000 | ten words"
    parsed = dc.parse_wordnet_line(line)
    assert parsed is not None and len(parsed.words) == 10 and parsed.words[-1] == "w9"


def test_parse_wordnet_adjective_markers() -> None:
    synset = dc.parse_wordnet_line(WORDNET_SATELLITE)
    assert synset is not None
    assert synset.words == ("afraid", "scared")
    assert dc.format_synset(synset) == "afraid, scared (adjective): filled with fear"


def test_parse_wordnet_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        dc.parse_wordnet_line("not a wordnet line | gloss")


def test_format_synset_dictionary_entry() -> None:
    synset = dc.parse_wordnet_line(WORDNET_NOUN)
    assert synset is not None
    entry = dc.format_synset(synset)
    assert entry.startswith("dog, domestic dog, Canis familiaris (noun): a member of the genus Canis")


def test_wordnet_documents_group_to_min_length() -> None:
    lines = [WORDNET_HEADER, WORDNET_ADJ, WORDNET_SATELLITE, WORDNET_NOUN]
    docs = dc.wordnet_documents("a", lines)
    assert [d.id for d in docs] == ["wordnet/a/00001740"]
    assert len(docs[0].text.split("\n")) == 3
    assert all(len(d.text) >= 200 for d in docs)


def test_group_entries() -> None:
    entries = [(f"k{i}", "y" * 90) for i in range(7)]
    groups = dc.group_entries(entries, min_chars=200, max_chars=1000)
    assert [k for k, _ in groups] == ["k0", "k3"]
    assert [t.count("\n") + 1 for _, t in groups] == [3, 4]  # short tail joins the last group
    long_entries = [("a", "z" * 300), ("b", "z" * 50)]
    assert [k for k, _ in dc.group_entries(long_entries)] == ["a"]


DUMPAVAIL = """Package: python3-numpy
Version: 1:1.24.2-1
Architecture: amd64
Description: Fast array facility to the Python 3 language
Description-md5: 4fef6b207fcddcc7678c9cb4c3a66bd2
Section: python
Priority: optional

Package: python3-numpy
Version: 1:1.20.0-1
Description: An older duplicate stanza
 This should never be used because the first stanza of a name wins, even
 though its long description is long enough to be kept on its own.
Section: python

Package: tiny
Description: too short
Description-md5: 00000000000000000000000000000001
Section: misc

Package: inline-long
Section: text
Description: has its long description inline
 First paragraph of the inline description, long enough to pass the filter
 of eighty characters.
 .
   verbatim line
 .
 Last paragraph.

Package: inline-long-doc
Section: doc
Description: documentation for inline-long
 First paragraph of the inline description, long enough to pass the filter
 of eighty characters.
 .
 This package contains the documentation.
"""


TRANSLATION = """Package: python3-numpy
Description-md5: 4fef6b207fcddcc7678c9cb4c3a66bd2
Description-en: Fast array facility to the Python 3 language
 Numpy contains a powerful N-dimensional array object, sophisticated
 (broadcasting) functions.
 .
 This package contains Numpy for Python 3.

Package: tiny
Description-md5: 00000000000000000000000000000001
Description-en: too short
 Short.
"""


def test_parse_deb822_continuations() -> None:
    stanzas = list(dc.parse_deb822(DUMPAVAIL))
    assert len(stanzas) == 5
    assert stanzas[0]["Package"] == "python3-numpy" and stanzas[0]["Section"] == "python"
    assert stanzas[3]["Description"].split("\n")[0] == "has its long description inline"
    assert stanzas[3]["Description"].count("\n") == 6


def test_split_description() -> None:
    desc = "synopsis here\n First para\n continues.\n .\n   verbatim\n .\n Second."
    assert dc.split_description(desc) == ("synopsis here", "First para\ncontinues.\n\n  verbatim\n\nSecond.")


def test_debian_documents() -> None:
    docs = dc.debian_documents(DUMPAVAIL, TRANSLATION)
    by_id = {d.id: d for d in docs}
    # tiny: long description too short; inline-long-doc: same first paragraph as inline-long.
    assert sorted(by_id) == ["debian/inline-long", "debian/python3-numpy"]
    numpy = by_id["debian/python3-numpy"].text
    assert numpy == (
        "Package: python3-numpy\nSection: python\nDescription: Fast array facility to the Python 3 language\n"
        "Numpy contains a powerful N-dimensional array object, sophisticated\n(broadcasting) functions.\n\n"
        "This package contains Numpy for Python 3."
    )
    assert "older duplicate" not in numpy
    inline = by_id["debian/inline-long"].text
    assert "\n\n  verbatim line\n\nLast paragraph." in inline
    assert all(d.source == "debian" for d in docs)


FORTUNE_FILE = (
    "A celebrity is a person who is known for his well-knownness.\n"
    "%\n"
    "A critic is a bundle of biases held loosely together by a sense of taste.\n"
    "\t\t-- Whitney Balliett\n"
    "%\n"
    "%\n"
    "  \n"
    "%\n" + ("Long story line that goes on and on.\n" * 20) + "%\n"
    "Last one, no trailing separator."
)


def test_split_fortune_records() -> None:
    records = dc.split_fortune_records(FORTUNE_FILE)
    assert len(records) == 4  # empty and whitespace-only records dropped
    assert records[0] == "A celebrity is a person who is known for his well-knownness."
    assert records[1].endswith("\t\t-- Whitney Balliett")
    assert records[3] == "Last one, no trailing separator."
    assert not any("%" == line for r in records for line in r.split("\n"))


def test_split_fortune_records_windows_line_endings_and_overstrike() -> None:
    records = dc.split_fortune_records("one\r\n%\r\n_\x08b_\x08o_\x08l_\x08d two\r\n%\r\n")
    assert records == ["one", "bold two"]


def test_group_fortunes() -> None:
    records = dc.split_fortune_records(FORTUNE_FILE)
    groups = dc.group_fortunes(records, max_chars=600)
    assert [start for start, _ in groups] == [0, 2, 3]
    assert groups[0][1] == records[0] + "\n%\n" + records[1]
    assert groups[1][1] == records[2]  # a long record stands alone
    assert all(len(text) <= 600 or "\n%\n" not in text for _, text in groups)


def test_fortune_documents_ids() -> None:
    docs = dc.fortune_documents("art", FORTUNE_FILE)
    assert [d.id for d in docs] == ["fortunes/art/0000", "fortunes/art/0002", "fortunes/art/0003"]
    assert all(d.source == "fortunes" and d.text for d in docs)


def test_is_fortune_data_file(tmp_path: Path) -> None:
    (tmp_path / "off").mkdir()
    for name in ("art", "art.dat", "off/racism"):
        (tmp_path / name).write_text("x\n%\ny\n")
    (tmp_path / "art.u8").symlink_to(tmp_path / "art")
    kept = sorted(
        p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if dc.is_fortune_data_file(p, tmp_path)
    )
    assert kept == ["art"]


def test_pydoc_documents_for_module_defined_objects_only() -> None:
    import json as json_module

    docs = dc.pydoc_documents_for_module(json_module, set(), {"json", "json.decoder", "json.encoder"})
    ids = {d.id for d in docs}
    assert "pydoc/json" in ids
    assert "pydoc/json.dumps" in ids
    assert "pydoc/json.JSONDecoder" not in ids  # defined in json.decoder, only re-exported by json
    dumps = next(d for d in docs if d.id == "pydoc/json.dumps")
    header, _, body = dumps.text.partition("\n\n")
    assert header.startswith("json.dumps(obj, *, skipkeys=False")
    assert body.startswith("Serialize ``obj`` to a JSON formatted ``str``.")
    assert all(len(d.text.partition("\n\n")[2]) >= 80 for d in docs)


def test_pydoc_topic_documents() -> None:
    topics = {"b": "Second topic.", "a": 'The "assert" statement\n' + "*" * 22 + "\n\nAssert statements."}
    docs = dc.pydoc_topic_documents(topics)
    assert [d.id for d in docs] == ["pydoc/topics/a/00", "pydoc/topics/b/00"]


def test_write_jsonl_gz_atomic_and_reproducible(tmp_path: Path) -> None:
    docs = [dc.Document("t/1", "caf\u00e9 \u2014 ok", "t"), dc.Document("t/2", "two\nlines", "t")]
    path = tmp_path / "train.jsonl.gz"
    assert dc.write_jsonl_gz(path, docs) == 2
    first = path.read_bytes()
    assert dc.write_jsonl_gz(path, docs) == 2
    assert path.read_bytes() == first  # no time stamp in the gzip header
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl.gz"]  # no temporary left
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert rows == [
        {"id": "t/1", "text": "caf\u00e9 \u2014 ok", "source": "t"},
        {"id": "t/2", "text": "two\nlines", "source": "t"},
    ]
