"""Automatic prototype labels: a category from a fixed taxonomy, a short role, a one-line
description and neighbourhood quality figures, all computed offline from the index.

Evidence per prototype j, from its neighbourhood (the top-M training positions of the index):

- the *form* of each neighbour's trigger token, read in its snippet: a number or date, a
  punctuation or layout token, a word piece whose next character continues the word, a
  function word, a name (capitalised mid-sentence, or all capitals), or a content word;
- the *source mix* of the neighbours' documents; purity is the largest source share;
- *distinctive words* near the triggers: class-based tf-idf (scikit-learn) in which the
  P neighbourhoods are the documents, so words near the triggers of many prototypes (the
  corpus-wide ones) score low; see :func:`_distinctive_words`;
- the tokens j *fires on* (its neighbours' trigger tokens), the tokens that follow them,
  and the tokens it *promotes* (top of E W_j, from the index);
- *coherence*: the mean pairwise cosine of the neighbours' hidden states. The index keeps
  no hidden states, so one batched forward pass re-reads each neighbour's snippet up to its
  trigger (at most the tokens the original context had; an EOS where the snippet starts
  its document). ``context_fidelity`` in the summary says how often j is still active there,
  ``coherence_baseline`` is the same mean over all pairs of neighbour states.

Category rule: a prototype never active is ``unused``; else the structural form that holds
at least half of the neighbours names the category (numbers first on ties); else the source
holding at least half names a topical category (SOURCE_TOPICS, or the source name itself for
corpora other than the demo); else ``mixed``. Confidence is the share of neighbours behind
that choice. Role: for a structural category, its most frequent forms, the token that
follows when one does in half the neighbourhood, and the topic when one source holds half;
otherwise the words it fires on (when two cover a quarter) and its distinctive words.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core import store
from core.atlas.evidence import (
    _FORM_NAMES,
    CATEGORIES,
    FORM_CATEGORIES,
    SOURCE_TOPICS,
    STRUCTURAL_SHARE,
    TOPIC_SHARE,
    _distinctive_words,
    _neighbour_rows,
    _topical_role,
    display_token,
    token_form,
    topic_for_source,
)
from core.atlas.layout import build_atlas, coherence, context_fidelity, load_atlas, neighbour_hidden_states
from core.bundle import load_bundle, model_fingerprint
from core.errors import LabelsError
from core.index.format import index_dir, load_index, register_index_file

__all__ = [
    "CATEGORIES",
    "SOURCE_TOPICS",
    "LabelsError",
    "PrototypeLabel",
    "build_labels",
    "load_labels",
    "build_atlas",
    "load_atlas",
    "label_texts",
    "quality_summary",
    "read_labels_file",
    "token_form",
]

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
LABELS_FORMAT = 1


@dataclass(frozen=True)
class PrototypeLabel:
    """The label and neighbourhood figures of one prototype.

    Attributes:
        id: prototype id.
        category: a key of CATEGORIES (or a source name, for corpora other than the demo).
        role: a few words: the forms it fires on, or its most distinctive words.
        description: one line of evidence behind the label.
        confidence: share of the neighbours behind the category (0..1).
        purity: largest source share among the neighbours.
        coherence: mean pairwise cosine of the neighbours' hidden states.
        usage_share: share of all active slots on the indexed data.
        dead: never active on the indexed data.
        source_mix: source -> share of the neighbours, largest first.
        promoted: tokens with the largest E W_j, strongest first.
        fires_on: the neighbours' most frequent trigger tokens, most frequent first.
    """

    id: int
    category: str
    role: str
    description: str
    confidence: float
    purity: float
    coherence: float
    usage_share: float
    dead: bool
    source_mix: dict[str, float]
    promoted: list[str]
    fires_on: list[str]

    def to_json(self) -> dict:
        """A JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> PrototypeLabel:
        return cls(**{name: record[name] for name in cls.__dataclass_fields__})

    @property
    def text(self) -> str:
        """``category: role``, as PrototypeIndex.label(j) shows it."""
        return f"{self.category}: {self.role}"


def _label_one(
    j: int,
    forms: list[tuple[str, str]],
    tokens: list[str],
    sources: list[str],
    next_tokens: list[str],
    words: list[str],
    promoted: list[str],
    coherence: float,
    usage_share: float,
    dead: bool,
) -> PrototypeLabel:
    """Decide one prototype's label from its neighbours' evidence (see the module docstring)."""
    n = max(1, len(forms))
    source_counts = Counter(sources)
    source_mix = {s: round(c / n, 4) for s, c in sorted(source_counts.items(), key=lambda kv: (-kv[1], kv[0]))}
    top_source, purity = next(iter(source_mix.items())) if source_mix else ("", 0.0)
    form_counts = Counter(form for form, _ in forms)
    structural = max(FORM_CATEGORIES, key=lambda f: (form_counts.get(f, 0), -list(FORM_CATEGORIES).index(f)))
    form_share = form_counts.get(structural, 0) / n
    fires_on = [t for t, _ in Counter(tokens).most_common(5)]
    topic = topic_for_source(top_source) if top_source else ""
    where = f" in {topic}" if purity >= TOPIC_SHARE else ""
    next_counts = Counter(next_tokens)
    top_next, top_next_count = next_counts.most_common(1)[0] if next_counts else ("", 0)
    if dead:
        category, confidence = "unused", 0.0
        role = "never active" + where
    elif form_share >= STRUCTURAL_SHARE:
        category, confidence = FORM_CATEGORIES[structural], form_share
        shown = [text for text, _ in Counter(text for form, text in forms if form == structural).most_common(2)]
        role = ", ".join(f"“{t}”" for t in shown)
        if top_next_count >= n * STRUCTURAL_SHARE and structural != "subword":  # what it leads to
            role += f" before “{top_next}”"
        role += where
    else:
        category, confidence = (topic, purity) if purity >= TOPIC_SHARE else ("mixed", max(purity, form_share))
        role = _topical_role(forms, words)
    counts = Counter(tokens)
    fired = ", ".join(f"“{t}” ×{counts[t]}" for t in fires_on[:3])
    mix = ", ".join(f"{s} {share:.0%}" for s, share in list(source_mix.items())[:2])
    followed = ", ".join(f"“{t}”" for t, _ in Counter(next_tokens).most_common(3))
    common_form, common_count = form_counts.most_common(1)[0] if form_counts else ("word", 0)
    description = (
        f"Fires on {fired} ({common_count}/{len(forms)} {_FORM_NAMES[common_form]}); sources {mix}; next {followed}"
    )
    if words:
        description += f"; words: {', '.join(words)}"
    return PrototypeLabel(
        id=j,
        category=category,
        role=role,
        description=description,
        confidence=round(confidence, 4),
        purity=round(purity, 4),
        coherence=round(float(coherence), 4),
        usage_share=float(usage_share),
        dead=dead,
        source_mix=source_mix,
        promoted=promoted,
        fires_on=fires_on,
    )


def build_labels(
    bundle_dir: str | Path, *, progress: bool = True, device: str = "cpu", dtype: str = "float32"
) -> list[PrototypeLabel]:
    """Label every prototype of an indexed bundle and write ``index/labels.json``.

    Args:
        bundle_dir: a PRISM bundle with an index (``prism index``).
        progress: show a progress bar for the forward pass over the neighbours.
        device, dtype: where and in what precision that pass runs (see :func:`core.bundle.load_bundle`).

    Returns:
        one label per prototype, in id order.

    Raises:
        PrototypeIndexError: no index, or one built for other weights.
    """
    t0 = time.time()
    bundle_dir = Path(bundle_dir)
    index = load_index(bundle_dir)
    bundle = load_bundle(bundle_dir, device=device, dtype=dtype)
    tokenizer = bundle.tokenizer
    rows = _neighbour_rows(index)
    sources = [index.documents[int(d)]["source"] for d in index.positions["document"]]
    token_text = {}

    def decode(token_id: int) -> str:
        if token_id not in token_text:
            token_text[token_id] = tokenizer.decode([token_id])
        return token_text[token_id]

    forms = [token_form(s["snippet"], s["start"], s["end"]) for s in index.snippets]  # per position row
    triggers = [display_token(s["snippet"][s["start"] : s["end"]]) for s in index.snippets]
    nexts = [display_token(decode(int(t))) for t in index.positions["next_token_id"]]
    words = _distinctive_words(index, rows)
    hidden, token_match = neighbour_hidden_states(bundle, index, progress)  # (R, d)
    unit = hidden / np.clip(np.linalg.norm(hidden, axis=1, keepdims=True), 1e-12, None)
    coherence_j = coherence(unit, rows)
    keys = bundle.model.prototypes.keys.detach().double().cpu().numpy()
    fidelity = context_fidelity(hidden, keys, bundle.model.config.prototype_top_k, rows)
    labels = []
    for j, r in enumerate(rows):
        promoted = [display_token(decode(int(t))) for t in index.promoted_token_ids[j][:8]]
        labels.append(
            _label_one(
                j,
                [forms[i] for i in r],
                [triggers[i] for i in r],
                [sources[i] for i in r],
                [nexts[i] for i in r],
                words[j],
                promoted,
                coherence_j[j],
                float(index.usage_share[j]),
                bool(index.usage_count[j] == 0),
            )
        )
    R = len(unit)
    total = unit.sum(axis=0)
    baseline = (float(total @ total) - R) / (R * (R - 1)) if R >= 2 else 0.0
    alive = ~np.array([label.dead for label in labels], dtype=bool)
    summary = {
        **quality_summary(labels),
        "coherence_baseline": round(baseline, 4),
        "context_fidelity": round(float(fidelity[alive].mean()) if alive.any() else 0.0, 4),
        "token_match": round(token_match, 4),
        "seconds": round(time.time() - t0, 1),
    }
    taxonomy = {
        **CATEGORIES,
        **{
            lab.category: f"text from the corpus source {lab.category!r}"
            for lab in labels
            if lab.category not in CATEGORIES
        },
    }
    payload = {
        "format_version": LABELS_FORMAT,
        "model_fingerprint": index.model_fingerprint,
        "index_created": index.meta.get("created"),
        "method": "neighbourhood forms, source mix, tf-idf words near triggers; see core/labels.py",
        "taxonomy": taxonomy,
        "summary": summary,
        "labels": [label.to_json() for label in labels],
    }
    folder = index_dir(bundle_dir)
    store.write_json(folder / LABELS_FILE, payload)
    register_index_file(folder, LABELS_FILE)
    logger.info("labels: %d prototypes in %.1f s", len(labels), summary["seconds"])
    return labels


def read_labels_file(bundle_dir: str | Path, fingerprint: str | None = None) -> dict | None:
    """The raw contents of ``index/labels.json`` (with "summary" and "taxonomy"), or None.

    The one reader of the labels file. It raises on a file it cannot use; a caller that can do
    without labels (the index, for ``PrototypeIndex.label``) catches :class:`LabelsError` and
    goes on without them.

    Args:
        bundle_dir: the bundle folder.
        fingerprint: the bundle's model fingerprint when the caller already has it (computed
            from the weights otherwise).

    Raises:
        LabelsError: the file is unreadable, of another format or made for other weights.
    """
    path = index_dir(bundle_dir) / LABELS_FILE
    if not path.is_file():
        return None
    hint = f"`prism label --model {bundle_dir}`"
    payload = store.read_json(path, "the labels file", f"rebuild it with {hint}", error=LabelsError)
    current = fingerprint or model_fingerprint(bundle_dir)
    record = payload if isinstance(payload, dict) else {}
    if record.get("format_version") != LABELS_FORMAT or record.get("model_fingerprint") != current:
        raise LabelsError(
            f"{path} was made for model {record.get('model_fingerprint')}, not this one ({current}); "
            f"rebuild it with {hint}"
        )
    return record


def label_texts(payload: dict) -> dict[int, str]:
    """Prototype id -> its label as one line, ``category: role`` (:attr:`PrototypeLabel.text`),
    from the contents of a labels file."""
    return {label.id: label.text for label in map(PrototypeLabel.from_json, payload.get("labels", []))}


def load_labels(bundle_dir: str | Path) -> list[PrototypeLabel] | None:
    """The bundle's labels in id order, or None when they have not been computed.

    Raises:
        LabelsError: the file is unreadable or was made for other weights.
    """
    payload = read_labels_file(bundle_dir)
    if payload is None:
        return None
    return [PrototypeLabel.from_json(record) for record in payload["labels"]]


def quality_summary(labels: list[PrototypeLabel]) -> dict:
    """Neighbourhood quality over all prototypes.

    Returns:
        prototypes, mean_purity, mean_coherence, mean_confidence (means over all prototypes),
        dead (count), dead_share, and categories: category -> share of prototypes, largest first.
    """
    n = len(labels)
    if n == 0:
        return {
            "prototypes": 0,
            "mean_purity": 0.0,
            "mean_coherence": 0.0,
            "mean_confidence": 0.0,
            "dead": 0,
            "dead_share": 0.0,
            "categories": {},
        }
    counts = Counter(label.category for label in labels)
    dead = sum(label.dead for label in labels)
    return {
        "prototypes": n,
        "mean_purity": round(float(np.mean([label.purity for label in labels])), 4),
        "mean_coherence": round(float(np.mean([label.coherence for label in labels])), 4),
        "mean_confidence": round(float(np.mean([label.confidence for label in labels])), 4),
        "dead": dead,
        "dead_share": round(dead / n, 4),
        "categories": {c: round(k / n, 4) for c, k in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))},
    }
