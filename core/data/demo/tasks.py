"""Demo tasks and behaviours, built deterministically from the validation split of the demo
corpus (documents the demo model never trained on).

Only the builders live here; :mod:`core.control.formats` reads the files they write.

Tasks (multiple choice, rows {"id", "prompt", "choices", "answer"}; see :mod:`core.control.calibration`):

- ``wordnet_pos``: the words of a dictionary entry; pick its part of speech (noun, verb,
  adjective, adverb). Nouns are capped at a third of the items, so the task's prior differs
  from the corpus's (two thirds of the validation entries are nouns);
- ``shakespeare_pronoun``: a passage of a play cut before "thou", "thee", "thy", "you" or
  "your"; pick the word the text has between the archaic and the modern form (two choices,
  balanced between archaic and modern answers);
- ``debian_section``: a package name; pick its archive section among four (the three others
  drawn from the sections of the other validation packages);
- ``shakespeare_speaker``: a passage of a play cut before a speech; pick who speaks next among
  four speakers of the same play;
- ``wordnet_definition``: a word and its part of speech; pick its definition among four
  (the three others are definitions of other words with the same part of speech);
- ``debian_description``: a package name and section; pick its one-line description among four;

shakespeare_speaker and the last two (the first ideas for demo tasks) are at chance for the
demo model (24.0%, 23.5%, 24.6% over all items), and calibrating wordnet_definition went from
24.2% to 22.5% held out: the model has no signal there for a controller to reweight.

Behaviours (``assets/behaviours/NAME.json``): prompts that elicit a behaviour of the demo
model, neutral prompts, a detector (a regular expression over the generated continuation)
and contrast texts for targeting (see :mod:`core.control.targeting`):

- ``archaic``: archaic second-person forms (thou, thee, thy, thine, ...) in continuations;
- ``package_boilerplate``: package-description boilerplate ("This package contains/provides ...").
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import defaultdict
from pathlib import Path

from core import store

TASK_NAMES = (
    "wordnet_pos",
    "shakespeare_pronoun",
    "debian_section",
    "shakespeare_speaker",
    "wordnet_definition",
    "debian_description",
)
PRONOUN_PAIRS = {"thou": "you", "you": "thou", "thy": "your", "your": "thy", "thee": "you"}
POS_NAMES = ("noun", "verb", "adjective", "adverb")
BEHAVIOUR_NAMES = ("archaic", "package_boilerplate")
ARCHAIC_WORDS = ("thou", "thee", "thy", "thine", "thyself", "hast", "hath", "dost", "doth", "art", "wilt", "shalt")
BOILERPLATE_PATTERN = r"\b(this package|package (contains|provides|includes)|Package:|Description:)"


def read_validation(corpus_dir: str | Path) -> dict[str, list[dict]]:
    """The validation documents of a corpus folder, grouped by source, in file order."""
    path = Path(corpus_dir) / "validation.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"no validation.jsonl.gz in {corpus_dir} (build the corpus with `prism corpus demo`)")
    by_source: dict[str, list[dict]] = defaultdict(list)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            by_source[row["source"]].append(row)
    return dict(by_source)


def _item(rng: random.Random, item_id: str, prompt: str, correct: str, distractors: list[str]) -> dict:
    choices = [correct, *distractors]
    rng.shuffle(choices)
    return {"id": item_id, "prompt": prompt, "choices": choices, "answer": choices.index(correct)}


def _distractors(rng: random.Random, pool: list[str], correct: str, n: int = 3) -> list[str] | None:
    options = [c for c in dict.fromkeys(pool) if c != correct]
    return rng.sample(options, n) if len(options) >= n else None


def _items_against_pool(rng: random.Random, entries: list[tuple[str, str]], name: str, limit: int) -> list[dict]:
    """(prompt, answer) pairs -> items whose three distractors are other entries' answers."""
    pool = [answer for _, answer in entries]
    items = []
    for n, (prompt, answer) in enumerate(entries):
        others = _distractors(rng, pool, answer)
        if others:
            items.append(_item(rng, f"{name}/{n}", prompt, answer, others))
    rng.shuffle(items)
    return items[:limit]


def wordnet_pos_items(docs: list[dict], rng: random.Random, limit: int) -> list[dict]:
    """The words of an entry -> its part of speech among the four."""
    entries = []
    for doc in docs:
        for line in doc["text"].split("\n"):
            m = re.match(r"^(.+?) \((noun|verb|adjective|adverb)\): ", line)
            if m:
                entries.append((m.group(1), m.group(2)))
    entries = list(dict.fromkeys(entries))
    rng.shuffle(entries)
    nouns = [e for e in entries if e[1] == "noun"][: limit // 3]
    kept = [e for e in entries if e[1] != "noun"][: limit - len(nouns)] + nouns
    rng.shuffle(kept)
    choices = [f" ({pos}):" for pos in POS_NAMES]
    return [
        {"id": f"wordnet_pos/{n}", "prompt": prompt, "choices": choices, "answer": POS_NAMES.index(pos)}
        for n, (prompt, pos) in enumerate(kept)
    ]


def shakespeare_pronoun_items(docs: list[dict], rng: random.Random, limit: int) -> list[dict]:
    """A passage cut before a second-person pronoun -> archaic or modern form."""
    archaic, modern = [], []
    for doc in docs:
        for m in re.finditer(r"(?<= )(thou|thee|thy|you|your)\b", doc["text"]):
            if m.start() < 100:
                continue
            word = m.group(1)
            prompt = doc["text"][max(0, m.start() - 200) : m.start()].rstrip(" ")
            entry = (doc["id"], prompt, " " + word, " " + PRONOUN_PAIRS[word])
            (archaic if word in ("thou", "thee", "thy") else modern).append(entry)
    rng.shuffle(archaic)
    rng.shuffle(modern)
    half = min(len(archaic), len(modern), limit // 2)
    items = []
    for n, (doc_id, prompt, right, wrong) in enumerate(archaic[:half] + modern[:half]):
        items.append(_item(rng, f"{doc_id}/pronoun{n}", prompt, right, [wrong]))
    rng.shuffle(items)
    return items


def debian_section_items(docs: list[dict], rng: random.Random, limit: int) -> list[dict]:
    """Package name -> its section among four."""
    entries = []
    for doc in docs:
        m = re.match(r"^Package: (\S+)\nSection: (\S+)", doc["text"])
        if m:
            entries.append((f"Package: {m.group(1)}\nSection:", " " + m.group(2)))
    return _items_against_pool(rng, entries, "debian_section", limit)


def shakespeare_speaker_items(docs: list[dict], rng: random.Random, limit: int) -> list[dict]:
    """A passage cut before a speech -> its speaker among four speakers of the same play."""
    speakers_of: dict[str, list[str]] = defaultdict(list)
    cuts = []
    for doc in docs:
        play = doc["id"].split("/")[1]
        for m in re.finditer(r"\n\n([A-Z][A-Z .'-]+)\.\n", doc["text"]):
            speakers_of[play].append(m.group(1))
            if m.start() >= 80:
                cuts.append((doc["id"], play, doc["text"][max(0, m.start() - 300) : m.start()] + "\n\n", m.group(1)))
    items = []
    per_doc: dict[str, int] = defaultdict(int)
    rng.shuffle(cuts)
    for doc_id, play, prompt, speaker in cuts:
        if per_doc[doc_id] == 2:
            continue
        others = _distractors(rng, speakers_of[play], speaker)
        if others:
            per_doc[doc_id] += 1
            choice = [f"{name}." for name in (speaker, *others)]
            items.append(_item(rng, f"{doc_id}/{per_doc[doc_id]}", prompt, choice[0], choice[1:]))
    return items[:limit]


def wordnet_items(docs: list[dict], rng: random.Random, limit: int) -> list[dict]:
    """Word (part of speech) -> its definition among four with the same part of speech."""
    entries = []
    for doc in docs:
        for line in doc["text"].split("\n"):
            m = re.match(r"^(.+?) \((noun|verb|adjective|adverb)\): (.+)$", line)
            if m:
                definition = m.group(3).split(";")[0].strip()
                entries.append((f"{m.group(1)} ({m.group(2)}):", m.group(2), " " + definition[:120]))
    by_pos: dict[str, list[str]] = defaultdict(list)
    for _, pos, definition in entries:
        by_pos[pos].append(definition)
    rng.shuffle(entries)
    items = []
    for n, (prompt, pos, definition) in enumerate(entries):
        others = _distractors(rng, by_pos[pos], definition)
        if others:
            items.append(_item(rng, f"wordnet/{n}", prompt, definition, others))
        if len(items) == limit:
            break
    return items


def debian_items(docs: list[dict], rng: random.Random, limit: int) -> list[dict]:
    """Package name and section -> its one-line description among four."""
    entries = []
    for doc in docs:
        m = re.match(r"^Package: (\S+)\nSection: (\S+)\nDescription: (.+)$", doc["text"], flags=re.MULTILINE)
        if m:
            entries.append((f"Package: {m.group(1)}\nSection: {m.group(2)}\nDescription:", " " + m.group(3).strip()))
    return _items_against_pool(rng, entries, "debian", limit)


def _speeches(text: str) -> list[str]:
    """The speeches of a play passage: "SPEAKER.\\nfirst line", stage directions left out."""
    speeches = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Z .'-]+\.", lines[0]) and len(lines[1]) > 10:
            speeches.append(f"{lines[0]}\n{lines[1]}")
    return speeches


def build_tasks(corpus_dir: str | Path, out_dir: str | Path, seed: int = 0, limit: int = 400) -> dict[str, int]:
    """Write ``out_dir/NAME.jsonl`` for every demo task; return the number of items of each."""
    validation = read_validation(corpus_dir)
    builders = {
        "wordnet_pos": (wordnet_pos_items, "wordnet"),
        "shakespeare_pronoun": (shakespeare_pronoun_items, "shakespeare"),
        "debian_section": (debian_section_items, "debian"),
        "shakespeare_speaker": (shakespeare_speaker_items, "shakespeare"),
        "wordnet_definition": (wordnet_items, "wordnet"),
        "debian_description": (debian_items, "debian"),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, (builder, source) in builders.items():
        items = builder(validation.get(source, []), random.Random(f"{seed}/{name}"), limit)
        store.write_jsonl(out / f"{name}.jsonl", items)
        counts[name] = len(items)
    return counts


def _cut_before(text: str, pattern: str, rng: random.Random, want: bool, min_context: int = 60) -> str | None:
    """A context of ``text`` ending right before a word that matches (``want``) or not."""
    words = [m for m in re.finditer(r"(?<=[ \n])[A-Za-z']+", text) if m.start() >= min_context]
    hits = [m for m in words if (re.fullmatch(pattern, m.group(0), flags=re.IGNORECASE) is not None) == want]
    if not hits:
        return None
    m = rng.choice(hits)
    return text[max(0, m.start() - 300) : m.start()].rstrip(" ")


def archaic_behaviour(validation: dict[str, list[dict]], seed: int) -> dict:
    """Archaic second person in Shakespeare-like continuations."""
    rng = random.Random(f"{seed}/archaic")
    docs = list(validation["shakespeare"])
    rng.shuffle(docs)
    words = "|".join(ARCHAIC_WORDS)
    half = len(docs) // 2
    # Prompts: the speaker line and the start of a speech; the continuation is sampled.
    prompts = []
    for doc in docs[:half]:
        for speech in _speeches(doc["text"])[:1]:
            speaker, line = speech.split("\n", 1)
            prompts.append(f"{speaker}\n{' '.join(line.split()[:3])}")
    contrast_b, contrast_n = [], []
    for doc in docs[half:]:
        b = _cut_before(doc["text"], words, rng, True)
        n = _cut_before(doc["text"], words, rng, False)
        if b and n:
            contrast_b.append(b)
            contrast_n.append(n)
    neutral = _neutral_prompts(validation, exclude="shakespeare", rng=rng)
    return {
        "name": "archaic",
        "description": "archaic second-person forms (thou, thee, thy, ...) in continuations of play dialogue",
        "pattern": rf"\b({words})\b",
        "words": list(ARCHAIC_WORDS),
        "source": "shakespeare",
        "prompts": prompts[:40],
        "neutral_prompts": neutral,
        "contrast_behaviour": contrast_b[:60],
        "contrast_neutral": contrast_n[:60],
    }


def boilerplate_behaviour(validation: dict[str, list[dict]], seed: int) -> dict:
    """Package-description boilerplate in continuations of short descriptions."""
    rng = random.Random(f"{seed}/package_boilerplate")
    docs = [d for d in validation["debian"] if "\nDescription: " in d["text"]]
    rng.shuffle(docs)
    half = len(docs) // 2
    prompts = []
    for doc in docs[:half]:
        head, _, _ = doc["text"].partition("\nDescription: ")
        first = doc["text"].split("\nDescription: ", 1)[1].split("\n", 1)[0]
        prompts.append(f"{head}\nDescription: {first}\n")
    contrast_b, contrast_n = [], []
    for doc in docs[half:]:
        text = doc["text"]
        m = re.search(r"\b[Tt]his package\b", text)
        if m and m.start() > 40:
            contrast_b.append(text[: m.start()].rstrip(" "))
            body_words = [w for w in re.finditer(r"(?<=[ \n])[a-z]+", text) if 40 < w.start() < m.start() - 1]
            if body_words:
                contrast_n.append(text[: rng.choice(body_words).start()].rstrip(" "))
    neutral = _neutral_prompts(validation, exclude="debian", rng=rng)
    return {
        "name": "package_boilerplate",
        "description": "drifting into package-description boilerplate (This package contains/provides, Package:, ...)",
        "pattern": BOILERPLATE_PATTERN,
        "words": ["package", "Package:", "Description:"],
        "source": "debian",
        "prompts": prompts[:40],
        "neutral_prompts": neutral,
        "contrast_behaviour": contrast_b[:60],
        "contrast_neutral": contrast_n[:60],
    }


def _neutral_prompts(
    validation: dict[str, list[dict]], exclude: str, rng: random.Random, per_source: int = 8
) -> list[str]:
    prompts = []
    for source in sorted(validation):
        if source == exclude:
            continue
        docs = rng.sample(validation[source], min(per_source, len(validation[source])))
        prompts.extend(d["text"][:200] for d in docs)
    return prompts


def build_behaviours(corpus_dir: str | Path, out_dir: str | Path, seed: int = 0) -> dict[str, int]:
    """Write ``out_dir/NAME.json`` for every demo behaviour; return the number of prompts of each."""
    validation = read_validation(corpus_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for data in (archaic_behaviour(validation, seed), boilerplate_behaviour(validation, seed)):
        store.atomic_write(out / f"{data['name']}.json", json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        counts[data["name"]] = len(data["prompts"])
    return counts
