"""Corpora: read, validate, split by document, tokenise and pack into training sequences.

A corpus is JSONL rows {"id": str, "text": str, "source": str} (optionally gzipped), a folder
holding ``train.jsonl[.gz]`` and ``validation.jsonl[.gz]`` (a fixed split), any other folder
of ``.jsonl[.gz]`` files, or a folder of ``.txt`` files (id = relative path, source = parent
folder). Without explicit split files, documents are split by a hash of their id.

Rows that are not valid UTF-8 or JSON (including JSON nested too deeply or holding a number too
long to read), or have no text, are skipped and counted, never fatal; a file that cannot be
read at all (a truncated or mislabelled .gz) is a :class:`CorpusError` naming it.
Every packed token keeps its (document index, character offset) so that attribution can
point back into the corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from core.errors import CorpusError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
SPLIT_FILES = {"train": ("train.jsonl", "train.jsonl.gz"), "validation": ("validation.jsonl", "validation.jsonl.gz")}


@dataclass
class CorpusFile:
    path: Path
    kind: str  # "jsonl" or "txt"
    split: str | None  # "train" / "validation" for explicit split files, else None


@dataclass
class Corpus:
    """A corpus split into train and validation documents.

    Attributes:
        train, validation: datasets with columns id, text, source.
        fingerprint: sha256 of the corpus files' bytes (and their names).
        skipped_rows: rows dropped as invalid (bad UTF-8, bad JSON, no text), by reason.
        path: where it was read from.
    """

    train: datasets.Dataset
    validation: datasets.Dataset
    fingerprint: str
    skipped_rows: dict[str, int] = field(default_factory=dict)
    path: str = ""

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped_rows.values())


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def corpus_files(path: str | Path) -> list[CorpusFile]:
    """List the files of a corpus path, or raise :class:`CorpusError`."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"corpus not found: {p} (give a .jsonl file or a folder of .jsonl/.txt files)")
    if p.is_file():
        if not (p.name.endswith(".jsonl") or p.name.endswith(".jsonl.gz") or p.suffix == ".txt"):
            raise CorpusError(f"unsupported corpus file {p}: expected .jsonl, .jsonl.gz or .txt")
        return [CorpusFile(p, "txt" if p.suffix == ".txt" else "jsonl", None)]
    explicit = {}
    for split, names in SPLIT_FILES.items():
        for name in names:
            if (p / name).is_file():
                explicit[split] = CorpusFile(p / name, "jsonl", split)
    if "train" in explicit:
        return list(explicit.values())
    files = sorted(
        [f for f in p.rglob("*") if f.is_file() and (f.name.endswith(".jsonl") or f.name.endswith(".jsonl.gz"))]
    )
    if files:
        return [CorpusFile(f, "jsonl", None) for f in files]
    files = sorted(f for f in p.rglob("*.txt") if f.is_file())
    if files:
        return [CorpusFile(f, "txt", None) for f in files]
    raise CorpusError(f"corpus folder {p} holds no .jsonl, .jsonl.gz or .txt files")


def fingerprint_files(files: list[CorpusFile], root: Path) -> str:
    """sha256 over each file's relative name and bytes."""
    digest = hashlib.sha256()
    for f in files:
        name = f.path.name if root.is_file() else str(f.path.relative_to(root))
        digest.update(name.encode() + b"\0")
        with open(f.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def iter_rows(files: list[CorpusFile], root: Path, skipped: dict[str, int] | None = None) -> Iterator[dict]:
    """Yield valid rows {"id", "text", "source", "split"}; count the invalid ones in ``skipped``."""
    skipped = skipped if skipped is not None else {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for f in files:
        if f.kind == "txt":
            try:
                text = f.path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skip("invalid_utf8")
                continue
            if not text.strip():
                skip("empty_text")
                continue
            rel = f.path.relative_to(root) if root.is_dir() else Path(f.path.name)
            source = rel.parent.name or (root.name if root.is_dir() else "text")
            yield {"id": str(rel), "text": text, "source": source, "split": f.split}
            continue
        try:
            yield from _jsonl_rows(f, skip)
        except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            raise CorpusError(
                f"corpus file {f.path} cannot be read ({err}); it is damaged or not what its name says: "
                "re-download it, or recompress it with gzip"
            ) from None


def _jsonl_rows(f: CorpusFile, skip) -> Iterator[dict]:
    """The valid rows of one JSONL file; ``skip(reason)`` counts each invalid one."""
    with _open_bytes(f.path) as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skip("invalid_utf8")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skip("invalid_json")
                continue
            except RecursionError:
                skip("nested_too_deeply")
                continue
            except ValueError:  # an integer of more than sys.get_int_max_str_digits() digits
                skip("number_too_long")
                continue
            if not isinstance(row, dict):
                skip("invalid_json")
                continue
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                skip("empty_text")
                continue
            doc_id = row.get("id")
            doc_id = str(doc_id) if isinstance(doc_id, (str, int, float)) else f"{f.path.name}:{line_no}"
            source = row.get("source")
            source = str(source) if source and isinstance(source, (str, int, float)) else "unknown"
            yield {"id": doc_id, "text": text, "source": source, "split": f.split}


def hash_fraction(doc_id: str) -> float:
    """A stable number in [0, 1) from a document id, for splitting."""
    return int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64


def _generate(spec: str, want: str) -> Iterator[dict]:
    # Lists in gen_kwargs would be taken as shards by `datasets`, so the spec travels as JSON;
    # it includes the corpus fingerprint, which keys the Arrow cache to the files' bytes.
    spec = json.loads(spec)
    corpus = [CorpusFile(Path(p), k, s) for p, k, s in zip(spec["files"], spec["kinds"], spec["splits"], strict=True)]
    validation = set(spec["validation_ids"])
    for row in iter_rows(corpus, Path(spec["root"])):
        split = row.pop("split") or ("validation" if row["id"] in validation else "train")
        if split == want:
            yield row


def load_corpus(path: str | Path, validation_fraction: float = 0.02, cache_dir: str | None = None) -> Corpus:
    """Read a corpus, count invalid rows, and split it by document.

    Args:
        path: a corpus file or folder (see the module docstring).
        validation_fraction: share of documents held out when the corpus has no split files.
        cache_dir: where `datasets` keeps its Arrow files (default: its own cache).

    Raises:
        CorpusError: the path is missing, holds no corpus files, or no valid documents.
    """
    root = Path(path)
    files = corpus_files(root)
    fingerprint = fingerprint_files(files, root)
    skipped: dict[str, int] = {}
    ids: list[str] = []
    explicit_validation = 0
    seen_ids: set[str] = set()
    for row in iter_rows(files, root, skipped):
        if row["split"] == "validation":
            explicit_validation += 1
        elif row["split"] is None:
            ids.append(row["id"])
        seen_ids.add(row["id"])
    if not seen_ids:
        detail = f" ({sum(skipped.values())} invalid rows skipped)" if skipped else ""
        raise CorpusError(f"corpus {root} has no usable documents{detail}")
    has_explicit = any(f.split is not None for f in files)
    validation_ids: list[str] = []
    if not has_explicit:
        validation_ids = sorted(i for i in ids if hash_fraction(i) < validation_fraction)
        if not validation_ids and len(ids) >= 2:
            validation_ids = [min(ids, key=hash_fraction)]  # keep at least one held-out document
    if skipped:
        logger.warning("corpus %s: skipped %d invalid rows %s", root, sum(skipped.values()), skipped)
    common = dict(
        files=[str(f.path) for f in files],
        kinds=[f.kind for f in files],
        splits=[f.split for f in files],
        root=str(root),
        validation_ids=validation_ids,
        fingerprint=fingerprint,
    )
    features = datasets.Features(
        {"id": datasets.Value("string"), "text": datasets.Value("string"), "source": datasets.Value("string")}
    )
    n_validation = explicit_validation if has_explicit else len(validation_ids)
    splits = {}
    for want in ("train", "validation"):
        if want == "validation" and n_validation == 0:
            # `datasets` refuses a generator that yields nothing (a one-document corpus).
            splits[want] = datasets.Dataset.from_dict({"id": [], "text": [], "source": []}, features=features)
            continue
        splits[want] = datasets.Dataset.from_generator(
            _generate, gen_kwargs={"spec": json.dumps(common), "want": want}, features=features, cache_dir=cache_dir
        )
    if len(splits["train"]) == 0:
        raise CorpusError(f"corpus {root} has no training documents")
    return Corpus(splits["train"], splits["validation"], fingerprint, skipped, str(root))


@contextmanager
def datasets_progress(enabled: bool) -> Iterator[None]:
    """Within the block, `datasets` shows its progress bars only if ``enabled``."""
    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets.enable_progress_bars()


def train_tokenizer(texts: Iterator[str], vocab_size: int, model_max_length: int):
    """Train a byte-level BPE tokenizer and wrap it for transformers.

    Returns:
        a ``PreTrainedTokenizerFast`` whose bos, eos and pad token is ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def pack(dataset: datasets.Dataset, tokenizer, seq_len: int, batch_size: int = 1000) -> datasets.Dataset:
    """Tokenise documents and pack them, separated by EOS, into sequences of ``seq_len`` tokens.

    Returns:
        a dataset with columns input_ids, doc_index (row of ``dataset``, -1 for EOS) and
        char_offset (start of the token in its document's text, -1 for EOS), each (seq_len,).
        A tail shorter than ``seq_len`` at the end of each map batch is dropped.
    """
    eos = tokenizer.eos_token_id

    def pack_batch(batch: dict, indices: list[int]) -> dict:
        enc = tokenizer(batch["text"], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, docs, offsets = [], [], []
        for row, token_ids, spans in zip(indices, enc["input_ids"], enc["offset_mapping"], strict=True):
            ids.extend(token_ids)
            ids.append(eos)
            docs.extend([row] * len(token_ids))
            docs.append(-1)
            offsets.extend(start for start, _ in spans)
            offsets.append(-1)
        n = len(ids) // seq_len * seq_len
        shape = (-1, seq_len)
        return {
            "input_ids": np.asarray(ids[:n], dtype=np.int32).reshape(shape),
            "doc_index": np.asarray(docs[:n], dtype=np.int32).reshape(shape),
            "char_offset": np.asarray(offsets[:n], dtype=np.int32).reshape(shape),
        }

    return dataset.map(
        pack_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=dataset.column_names,
        desc="packing",
    )


def token_counts_by_source(dataset: datasets.Dataset, tokenizer) -> dict[str, int]:
    """Number of tokens per source (without separators)."""
    counts: dict[str, int] = {}
    for start in range(0, len(dataset), 2000):
        batch = dataset[start : start + 2000]
        lengths = [len(x) for x in tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]]
        for source, n in zip(batch["source"], lengths, strict=True):
            counts[source] = counts.get(source, 0) + n
    return counts
