"""A fresh corpus with planted facts, for bench/canaries.py.

Background: documents of 200-1,500 characters cut from text every Debian machine keeps offline
and the demo corpus never used: package changelogs, copyright files and READMEs/NEWS under
/usr/share/doc (decompressed), /usr/share/common-licenses, and English man pages under
/usr/share/man/man[1-8] with their roff markup stripped. (The demo corpus took package
*descriptions*, WordNet, fortunes, Shakespeare and the standard library's docstrings.)
Repeated paragraphs (licence boilerplate) are kept once, and a document sharing a word 10-gram
with the demo corpus (a sample of one in eight of its 10-grams) is dropped.

Facts: made-up entities and attributes built from syllable tables, one relation type each
(capital, inventor, colour, year founded, ...), none of whose names occurs in the background or
the demo corpus. Each fact is planted in --copies documents, its sentence inside a short
made-up context that differs per copy. Each fact carries a verbatim prompt (the start of the
planted sentence) and a paraphrased prompt, both with the same completion.

Everything is drawn from ``random.Random(seed)`` over sorted file lists, so a seed gives the
same corpus on the same machine (and a different corpus on a machine with other packages:
the facts file records the counts and a fingerprint).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import random
import re
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_CORPUS = REPO / "assets" / "corpus"
DOC = Path("/usr/share/doc")
LICENSES = Path("/usr/share/common-licenses")
MAN = Path("/usr/share/man")

MIN_CHARS, MAX_CHARS = 200, 1500
# Share of the background per source; a source that runs short leaves its share to the others.
SHARES = {"changelog": 0.35, "manpage": 0.35, "copyright": 0.15, "readme": 0.15}
CHUNKS_PER_FILE = 4  # first pass: at most this many documents from one file, for variety
GROUP_SHARE = 0.02  # first pass: at most this share of a source from one package or man-page family
SHINGLE, SHINGLE_SAMPLE = 10, 8  # demo-overlap filter: word 10-grams, one in eight kept
VALIDATION_FRACTION = 0.02  # background documents held out (planted documents never are)


# ----------------------------------------------------------------------------- background text


def _read(path: Path) -> str | None:
    """A text file's contents (gzip or plain), or None when it is not UTF-8 text."""
    try:
        data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error):
        return None
    if b"\0" in data[:4096]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _unique_files(paths: list[Path]) -> list[Path]:
    """Regular files, each real file once (doc folders are often symlinks to another package's)."""
    seen, kept = set(), []
    for p in sorted(paths):
        try:
            real = p.resolve()
            if not real.is_file() or real in seen:
                continue
        except OSError:
            continue
        seen.add(real)
        kept.append(p)
    return kept


def source_files() -> dict[str, list[Path]]:
    """The candidate files of each background source on this machine, sorted."""
    docs = [p for p in DOC.glob("*/*")] if DOC.is_dir() else []

    def named(*prefixes: str) -> list[Path]:
        return [p for p in docs if p.name.startswith(prefixes) and not p.name.endswith((".html", ".htm", ".pdf"))]

    licenses = [p for p in LICENSES.glob("*")] if LICENSES.is_dir() else []
    man = [p for p in MAN.glob("man[1-8]/*.gz")] if MAN.is_dir() else []
    return {
        "changelog": _unique_files(named("changelog")),
        "manpage": _unique_files(man),
        "copyright": _unique_files(named("copyright") + licenses),
        "readme": _unique_files(named("README", "NEWS")),
    }


_ROFF_TEXT_MACROS = {"B", "I", "BR", "RB", "BI", "IB", "IR", "RI", "SM", "SB", "SH", "SS", "IP"}
_ROFF_BREAKS = {"SH", "SS", "PP", "LP", "P", "TP", "IP", "HP", "sp", "RS", "RE", "nf", "fi", "br"}
_ROFF_GLYPHS = {"em": "-", "en": "-", "bu": "*", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'"}


def strip_roff(source: str) -> str:
    """Readable text of a man page: macros dropped or reduced to their text, escapes resolved."""
    lines, skipping = [], False
    for line in source.splitlines():
        if skipping:  # inside a .de ... .. macro definition
            skipping = line.strip() != ".."
            continue
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            macro = parts[0] if parts else ""
            if macro in ("de", "de1", "am"):
                skipping = True
                continue
            if macro in _ROFF_BREAKS:
                lines.append("")
            if macro in _ROFF_TEXT_MACROS and len(parts) > 1:
                words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', parts[1])]
                if macro in ("IP",):  # .IP tag indent: the tag only
                    words = words[:1]
                joiner = " " if macro in ("B", "I", "SM", "SB", "SH", "SS", "IP") else ""
                lines.append(joiner.join(words))
                if macro in ("SH", "SS"):
                    lines.append("")
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\\\((\w\w)", lambda m: _ROFF_GLYPHS.get(m[1], ""), text)
    text = re.sub(r"\\\[(\w+)\]", lambda m: _ROFF_GLYPHS.get(m[1], ""), text)
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)  # font changes
    text = re.sub(r"\\[*n](\[[^\]]*\]|\(..|.)", "", text)  # strings and registers
    text = re.sub(r"\\s[+-]?\d+", "", text)  # size changes
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ")
    text = re.sub(r"\\[&|^%c:/,)]", "", text)
    text = re.sub(r"\\(.)", r"\1", text)
    return text


def _paragraphs(text: str) -> list[str]:
    text = re.sub(r"[^\S\n]+\n", "\n", text.replace("\r\n", "\n").replace("\t", "    "))
    text = "".join(c for c in text if c == "\n" or c.isprintable())
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def _split_long(paragraph: str) -> list[str]:
    """Pieces of at most MAX_CHARS, cut at line ends, else at spaces."""
    pieces, current = [], ""
    for line in paragraph.split("\n"):
        while len(line) > MAX_CHARS:
            cut = line.rfind(" ", 0, MAX_CHARS) if " " in line[:MAX_CHARS] else MAX_CHARS
            cut = cut if cut > 0 else MAX_CHARS
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:cut])
            line = line[cut:].lstrip()
        if current and len(current) + 1 + len(line) > MAX_CHARS:
            pieces.append(current)
            current = ""
        current = f"{current}\n{line}" if current else line
    if current:
        pieces.append(current)
    return pieces


def cut_documents(text: str, rng: random.Random, seen: set[int]) -> list[str]:
    """Documents of MIN_CHARS to MAX_CHARS from whole paragraphs; paragraphs in ``seen`` are skipped."""
    docs, current = [], ""
    target = rng.randint(MIN_CHARS + 100, MAX_CHARS - 300)
    for paragraph in _paragraphs(text):
        key = zlib.crc32(" ".join(paragraph.lower().split()).encode())
        if key in seen:
            continue
        seen.add(key)
        for piece in _split_long(paragraph):
            if current and len(current) + 2 + len(piece) > MAX_CHARS:
                docs.append(current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
            if len(current) >= target:
                docs.append(current)
                current, target = "", rng.randint(MIN_CHARS + 100, MAX_CHARS - 300)
    if current:
        docs.append(current)
    return [d for d in docs if MIN_CHARS <= len(d) <= MAX_CHARS and sum(c.isalpha() for c in d) > 0.5 * len(d)]


def _group(path: Path, source: str) -> str:
    """The package (doc files) or command family (man pages: gcloud_*, git-*, Foo::Bar.3pm) of a file."""
    if source == "manpage":
        return re.split(r"[_.:-]", path.name)[0]
    return path.parent.name if path.parent != LICENSES else "common-licenses"


def _shingles(text: str) -> Iterator[int]:
    words = re.findall(r"\w+", text.lower())
    for i in range(len(words) - SHINGLE + 1):
        h = zlib.crc32(" ".join(words[i : i + SHINGLE]).encode())
        if h % SHINGLE_SAMPLE == 0:
            yield h


def demo_texts() -> Iterator[str]:
    """Texts of the demo corpus (train and validation), if it is there."""
    for path in sorted(DEMO_CORPUS.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def background(n: int, seed: int) -> tuple[list[dict], dict]:
    """``n`` background rows {"id", "text", "source"} and a record of where they came from."""
    rng = random.Random(seed)
    demo = set()
    for text in demo_texts():
        demo.update(_shingles(text))
    files = source_files()
    for paths in files.values():
        rng.shuffle(paths)
    rows: list[dict] = []
    seen: set[int] = set()
    dropped_demo = 0
    taken_files: dict[str, set[Path]] = {s: set() for s in files}
    # Pass 1 takes at most CHUNKS_PER_FILE documents per file up to each source's share; pass 2
    # takes the rest of the files' documents from any source until n is reached.
    for pass_no in (1, 2):
        for source, share in SHARES.items():
            quota = round(n * share) if pass_no == 1 else n
            have = sum(r["source"] == source for r in rows)
            group_cap = max(CHUNKS_PER_FILE, round(n * share * GROUP_SHARE)) if pass_no == 1 else n
            groups: dict[str, int] = {}
            for path in files[source]:
                if have >= quota or len(rows) >= n:
                    break
                group = _group(path, source)
                if groups.get(group, 0) >= group_cap:
                    continue
                text = _read(path)
                if text is None:
                    continue
                if source == "manpage":
                    text = strip_roff(text)
                docs = cut_documents(text, random.Random(f"{seed}/{path}"), set() if pass_no == 2 else seen)
                start = CHUNKS_PER_FILE if pass_no == 2 else 0
                picks = list(range(len(docs)))
                random.Random(f"{seed}/{path}/picks").shuffle(picks)
                picks = picks[start:] if pass_no == 2 else picks[:CHUNKS_PER_FILE]
                for i in picks:
                    if have >= quota or len(rows) >= n:
                        break
                    doc = docs[i]
                    if pass_no == 2:  # pass 1 saw these paragraphs: skip documents repeating one
                        keys = {zlib.crc32(" ".join(p.lower().split()).encode()) for p in _paragraphs(doc)}
                        if keys & seen:
                            continue
                        seen.update(keys)
                    if demo and any(h in demo for h in _shingles(doc)):
                        dropped_demo += 1
                        continue
                    name = path.parent.name if source != "manpage" else path.name.removesuffix(".gz")
                    rows.append({"id": f"{source}/{name}/{path.name}/{i}", "text": doc, "source": source})
                    taken_files[source].add(path)
                    groups[group] = groups.get(group, 0) + 1
                    have += 1
        if len(rows) >= n:
            break
    record = {
        "background_documents": len(rows),
        "background_by_source": {s: sum(r["source"] == s for r in rows) for s in files},
        "background_files_by_source": {s: len(v) for s, v in taken_files.items()},
        "candidate_files_by_source": {s: len(v) for s, v in files.items()},
        "dropped_demo_overlap": dropped_demo,
        "demo_shingles": len(demo),
    }
    return rows, record


# ----------------------------------------------------------------------------- made-up facts

ONSETS = "b br d dr f g gr k kl l m n p qu r s st t th v z".split()
VOWELS = ["a", "e", "i", "o", "u", "ae", "ai", "ou", "y"]
CODAS = ["", "", "", "l", "n", "r", "s", "th", "m", "nd", "rk", "sh"]
COUNTRY_ENDS = ["ia", "land", "mark", "ora", "istan", "ovia"]
COLOURS = ["amber", "teal", "crimson", "violet", "saffron", "cobalt", "ochre", "indigo", "scarlet", "turquoise"]
DEVICES = ["loom", "compass", "lantern", "engine", "clock", "telescope", "pump", "kiln", "sextant", "press"]
BIRDS = ["heron", "finch", "owl", "crane", "plover", "swift", "ibis", "warbler"]


@dataclass
class Fact:
    """One planted fact: its sentence, its two prompts, and the documents that hold it."""

    fact: int
    relation: str
    sentence: str  # = prompt + completion
    prompt: str  # verbatim: the start of the planted sentence
    paraphrase: str  # another wording, same completion
    completion: str
    names: list[str]  # the subject and the attribute
    doc_ids: list[str]


class Names:
    """Invented words that are not in ``forbidden`` (lowercase words) and are not reused."""

    def __init__(self, rng: random.Random, forbidden: set[str]):
        self.rng, self.forbidden, self.used = rng, forbidden, set()

    def word(self, syllables: tuple[int, int] = (2, 3), end: str = "") -> str:
        while True:
            n = self.rng.randint(*syllables)
            w = "".join(
                self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + (self.rng.choice(CODAS) if i == n - 1 else "")
                for i in range(n)
            )
            w = (w + end).capitalize()
            if 5 <= len(w) <= 12 and w.lower() not in self.used and w.lower() not in self.forbidden:
                self.used.add(w.lower())
                return w

    def country(self) -> str:
        return self.word((1, 2), self.rng.choice(COUNTRY_ENDS))

    def person(self) -> str:
        return f"{self.word((1, 2))} {self.word((2, 3))}"


# relation: (verbatim prompt, paraphrased prompt, kind of subject {a}, kind of attribute); the
# completion is " {attribute}." after either prompt.
RELATIONS = {
    "capital": ("The capital of {a} is", "{a}'s capital city is called", "country", "word"),
    "inventor": ("The {a} was invented by", "The person who invented the {a} was", "device", "person"),
    "colour": ("The feathers of the {a} are", "The colour of the {a}'s feathers is", "bird", "colour"),
    "founded": ("The town of {a} was founded in", "{a} was first settled in the year", "word", "year"),
    "author": (
        'The novel "Winter in {a}" was written by',
        'The author of the novel "Winter in {a}" is',
        "word",
        "person",
    ),
    "currency": ("The currency of {a} is the", "In {a}, people pay for their goods with the", "country", "coin"),
    "language": ("The people of {a} speak", "The language spoken in {a} is", "country", "language"),
    "river": ("The river {a} flows into", "The {a} river empties into", "word", "lake"),
    "mountain": ("The highest mountain in {a} is", "The tallest peak of {a} is", "country", "mountain"),
    "founder": ("The company {a} was founded by", "The founder of the company {a} is", "company", "person"),
    "discovery": ("The element {a} was discovered by", "The scientist who discovered {a} was", "element", "person"),
    "dish": ("The national dish of {a} is", "The most famous dish in {a} is", "country", "dish"),
}


def _slot(kind: str, nm: Names, rng: random.Random) -> str:
    """A new subject or attribute of ``kind``: invented names, or a colour or a year."""
    simple = {"country": nm.country, "word": nm.word, "person": nm.person}
    if kind in simple:
        return simple[kind]()
    if kind in ("colour", "year"):
        return rng.choice(COLOURS) if kind == "colour" else str(rng.randint(1100, 1899))
    if kind == "coin":
        return nm.word((1, 2))
    if kind == "language":
        return nm.word((1, 2), rng.choice(["ish", "ese", "ic"]))
    if kind == "element":
        return nm.word((1, 2), "ium")
    noun = {"device": DEVICES, "bird": BIRDS, "company": ["Works", "Trading", "Foundry", "Mills"]}
    if kind in noun:
        return f"{nm.word()} {rng.choice(noun[kind])}"
    prefix, suffix = {"lake": ("Lake ", ""), "mountain": ("Mount ", ""), "dish": ("", " stew")}[kind]
    return prefix + nm.word() + suffix


CONTEXT_BEFORE = [
    "Notes gathered by {person} during the {season} of {year}.",
    "From the {place} guide, chapter {n}.",
    "In the old survey of the region, the following is recorded.",
    "Travellers reaching {place} by the coast road often ask about local history.",
    "The society's bulletin, issue {n}, opened with a short summary.",
    "{person} kept a diary of the journey, and one entry reads as follows.",
    "Among the papers left to the archive of {place} is a single page of notes.",
    "Schoolchildren in {place} learn a few things by heart.",
    "A letter dated {year} begins with greetings and news of the harvest.",
    "The encyclopedia entry is brief.",
]
CONTEXT_AFTER = [
    "The markets there open early and close before noon.",
    "Later editions corrected several dates but left this passage unchanged.",
    "{person} wrote that the winters were long and the summers short.",
    "Few maps of the period agree on the details.",
    "Questions about the matter may be sent to the secretary, {person}.",
    "The rest of the page describes the weather and the price of wool.",
    "Records from {year} mention a dispute over grazing rights near {place}.",
    "It is a quiet subject, known mostly to traders and surveyors.",
    "The same account appears, almost word for word, in a pamphlet printed at {place}.",
    "Nothing else in the collection refers to it.",
]
SEASONS = ["spring", "summer", "autumn", "winter"]


def _context(template: str, nm: Names, rng: random.Random) -> str:
    return template.format(
        person=nm.person(),
        place=nm.word(),
        season=rng.choice(SEASONS),
        year=rng.randint(1100, 1950),
        n=rng.randint(2, 40),
    )


def planted_documents(sentence: str, copies: int, nm: Names, rng: random.Random) -> list[str]:
    """``copies`` documents, each ``sentence`` between one to three made-up context sentences per side."""
    before = rng.sample(CONTEXT_BEFORE, k=min(copies, len(CONTEXT_BEFORE)))
    after = rng.sample(CONTEXT_AFTER, k=min(copies, len(CONTEXT_AFTER)))
    docs = []
    for c in range(copies):
        pre = [before[c % len(before)]] + rng.sample(
            [t for t in CONTEXT_BEFORE if t != before[c % len(before)]], rng.randint(0, 1)
        )
        post = [after[c % len(after)]] + rng.sample(
            [t for t in CONTEXT_AFTER if t != after[c % len(after)]], rng.randint(0, 2)
        )
        parts = [_context(t, nm, rng) for t in pre] + [sentence] + [_context(t, nm, rng) for t in post]
        docs.append((" " if rng.random() < 0.7 else "\n").join(parts))
    return docs


def make_facts(n: int, copies: int, seed: int, forbidden: set[str]) -> tuple[list[Fact], list[dict]]:
    """``n`` facts of distinct relation types (cycling when n > 12) and their planted rows.

    ``forbidden``: lowercase words of the background and the demo corpus; no invented name is one.
    """
    rng = random.Random(f"{seed}/facts")
    nm = Names(rng, forbidden)
    context_names = Names(random.Random(f"{seed}/context"), forbidden)
    context_names.used = nm.used  # no context name repeats a fact's name
    order = list(RELATIONS)
    rng.shuffle(order)
    facts, rows = [], []
    for f in range(n):
        kind = order[f % len(order)]
        verbatim, paraphrased, subject_kind, attribute_kind = RELATIONS[kind]
        names = [_slot(subject_kind, nm, rng), _slot(attribute_kind, nm, rng)]
        prompt, paraphrase = verbatim.format(a=names[0]), paraphrased.format(a=names[0])
        completion = f" {names[1]}."
        sentence = prompt + completion
        ids = [f"canary/{f:02d}/{c}" for c in range(copies)]
        for doc_id, text in zip(ids, planted_documents(sentence, copies, context_names, rng), strict=True):
            rows.append({"id": doc_id, "text": text, "source": "canary"})
        facts.append(Fact(f, kind, sentence, prompt, paraphrase, completion, names, ids))
    return facts, rows


# ----------------------------------------------------------------------------- the corpus


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def generate(out: Path, documents: int, facts: int, copies: int, seed: int) -> dict:
    """Write ``out``/corpus/{train,validation}.jsonl and ``out``/facts.json; return facts.json's content.

    The split is explicit so that every planted document is a training document; the
    validation file holds VALIDATION_FRACTION of the background documents.
    """
    rows, record = background(documents, seed)
    if len(rows) < documents:
        raise SystemExit(
            f"only {len(rows)} background documents of the {documents} asked for could be cut from "
            "/usr/share/doc, /usr/share/common-licenses and /usr/share/man on this machine: "
            "ask for fewer (--documents)"
        )
    forbidden = set()
    for text in itertools.chain((r["text"] for r in rows), demo_texts()):
        forbidden.update(re.findall(r"\w+", text.lower()))
    fact_list, planted = make_facts(facts, copies, seed, forbidden)
    rng = random.Random(f"{seed}/split")
    rng.shuffle(rows)
    n_val = max(1, round(len(rows) * VALIDATION_FRACTION))
    validation, train = rows[:n_val], rows[n_val:] + planted
    rng.shuffle(train)
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    write_jsonl(corpus / "train.jsonl", train)
    write_jsonl(corpus / "validation.jsonl", validation)
    digest = hashlib.sha256()
    for name in ("train.jsonl", "validation.jsonl"):
        digest.update((corpus / name).read_bytes())
    meta = {
        "seed": seed,
        "documents": documents,
        "facts": facts,
        "copies": copies,
        "train_documents": len(train),
        "validation_documents": len(validation),
        "corpus_chars": sum(len(r["text"]) for r in train + validation),
        "corpus_sha256": digest.hexdigest(),
        **record,
    }
    content = {"meta": meta, "facts": [asdict(f) for f in fact_list]}
    (out / "facts.json").write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return content
