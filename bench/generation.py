"""Generation settings measured: which one writes text most like the corpus's own.

Protocol. The prompts are the first 12 tokens of --prompts validation documents of --corpus
(a fixed selection: the documents with at least 12 + --new-tokens tokens, an equal share from
each source in sorted order, drawn with random.Random(0); the same prompts for every --seed).
Each setting of the grid continues every prompt by --new-tokens tokens with
core.generation.generate_text, as `prism generate` does; prompt i is sampled with seed
1000 * --seed + i (one seed for every prompt would draw the same random numbers for all of
them: their errors would move together, and the standard errors would understate the noise).
Per setting, over the prompts (mean and standard error, SE = sd / sqrt(n)):

- distinct-1/2/3: unique n-grams / n-grams of each continuation's tokens, then averaged;
- repeated 4-grams: the share of each continuation's 4-grams that occurred earlier in it;
- perplexity under the dense twin (--twin): exp(mean NLL) of the continuation after its
  prompt, per prompt; and the mean of its log (the twin's mean NLL per token);
- tokens: a continuation ends early where the model writes its end-of-text token.

The human reference is the same figures for the documents' own next --new-tokens tokens.
Both measures depend on length (a shorter text repeats less; later tokens have more context),
so each setting is compared with the reference cut to the same lengths ("matched"): for each
prompt, the document's first as many tokens as the setting generated.

The rule that picks the default. For each setting, its distance to the matched reference is

    sqrt(((D2 - D2_ref) / sd(D2_ref))^2 + ((L - L_ref) / sd(L_ref))^2)

where D2 is the mean distinct-2 and L the mean log twin perplexity over the prompts (the
setting's, and the matched reference's), and sd(.) is the standard deviation of the full-length
reference's per-document values (how much human continuations differ from each other): the
distance in units of human variation, in the plane of (diversity, naturalness to an
independent model). The setting with the smallest distance is chosen (the first in grid order
on a tie). Greedy loops score low on distinct-2 and an unnaturally low perplexity; sampling
from the whole distribution scores high on both; the rule picks the setting between them that
reads like the corpus. How firm the choice is: the share of 2,000 bootstrap resamples of the
prompts (paired across settings) in which each setting has the smallest distance. Copy the
chosen setting into core.generation.DEFAULT_GENERATION (the script prints the line).

    python bench/generation.py                          # the demo bundle and its twin (~5 min on 2 cores)
    python bench/generation.py --model DIR --twin DIR --results-tag NAME
    python bench/generation.py --prompts 5 --new-tokens 16 --no-results   # a smoke run

Prints the table (markdown) and the chosen setting; the last line is one JSON object with
every figure, also written to bench/results/generation[.TAG].json (bench/_results.py).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _results  # noqa: E402

if TYPE_CHECKING:
    from core import Bundle, GenerationSettings

PROMPT_TOKENS = 12
SELECTION_SEED = 0  # the prompts are the same documents whatever --seed
RESAMPLES = 2000  # bootstrap resamples of the prompts: how firm the choice is


def grid() -> list[GenerationSettings]:
    """The settings measured: greedy with and without the repetition options, then sampling."""
    from core import GREEDY, GenerationSettings

    sampled = [GenerationSettings(do_sample=True, temperature=t, top_p=p) for t in (0.7, 0.8, 1.0) for p in (0.9, 0.95)]
    return [
        GREEDY,
        GenerationSettings(no_repeat_ngram_size=3),
        GenerationSettings(repetition_penalty=1.2),
        GenerationSettings(repetition_penalty=1.3),
        *sampled,
        GenerationSettings(do_sample=True),  # the model's own distribution, untempered
        GenerationSettings(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2),
        GenerationSettings(do_sample=True, temperature=0.8, top_p=0.95, repetition_penalty=1.2),
        GenerationSettings(do_sample=True, temperature=0.8, top_p=0.95, no_repeat_ngram_size=3),
    ]


def label(settings: GenerationSettings) -> str:
    """A short name for a table row: "greedy", "T 0.8, top-p 0.95, rep 1.2", ..."""
    parts = [f"T {settings.temperature:g}, top-p {settings.top_p:g}"] if settings.do_sample else ["greedy"]
    if settings.repetition_penalty != 1.0:
        parts.append(f"rep {settings.repetition_penalty:g}")
    if settings.no_repeat_ngram_size:
        parts.append(f"no-repeat {settings.no_repeat_ngram_size}")
    return ", ".join(parts)


def select_documents(validation, tokenizer, count: int, new_tokens: int) -> list[tuple[str, list[int]]]:
    """(source, token ids) of ``count`` validation documents with at least 12 + ``new_tokens``
    tokens: an equal share per source (sorted; the first sources take the remainder)."""
    needed = PROMPT_TOKENS + new_tokens
    by_source: dict[str, list[list[int]]] = {}
    for source, text in zip(validation["source"], validation["text"], strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= needed:
            by_source.setdefault(source, []).append(ids[:needed])
    sources = sorted(by_source)
    if not sources:
        sys.exit(f"no validation document has {needed} tokens")
    rng = random.Random(SELECTION_SEED)
    chosen = []
    for i, source in enumerate(sources):
        share = count // len(sources) + (1 if i < count % len(sources) else 0)
        docs = by_source[source]
        if share > len(docs):
            sys.exit(f"source {source} has {len(docs)} documents of {needed} tokens; {share} are needed")
        chosen += [(source, docs[j]) for j in sorted(rng.sample(range(len(docs)), share))]
    return chosen


def distinct(ids: list[int], n: int) -> float:
    """Unique n-grams / n-grams of ``ids`` (nan when it has none)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repeated(ids: list[int], n: int = 4) -> float:
    """The share of the n-grams of ``ids`` that occurred earlier in it (nan when it has none)."""
    seen, repeats, grams = set(), 0, 0
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i : i + n])
        repeats += gram in seen
        seen.add(gram)
        grams += 1
    return repeats / grams if grams else math.nan


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the finite values (nan when there are none)."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def figures_of(continuations: list[tuple[list[int], list[int]]], twin: Bundle) -> tuple[dict, dict]:
    """(summary figures, per-continuation values) of (prompt ids, continuation ids) pairs; an
    empty continuation counts in ``tokens`` only."""
    from core import continuation_perplexity

    per: dict[str, list[float]] = {"distinct_1": [], "distinct_2": [], "distinct_3": [], "repeated_4": []}
    per |= {"twin_ppl": [], "twin_log_ppl": [], "tokens": []}
    for prompt_ids, new_ids in continuations:
        for n in (1, 2, 3):
            per[f"distinct_{n}"].append(distinct(new_ids, n))
        per["repeated_4"].append(repeated(new_ids))
        ppl = continuation_perplexity(twin, prompt_ids, new_ids)
        per["twin_ppl"].append(ppl)
        per["twin_log_ppl"].append(math.log(ppl) if math.isfinite(ppl) else math.nan)
        per["tokens"].append(len(new_ids))
    summary = {}
    for name, values in per.items():
        summary[name], summary[f"{name}_se"] = mean_se(values)
    return summary, per


AXES = ("distinct_2", "twin_log_ppl")  # the rule's plane


def distances(own: np.ndarray, matched: np.ndarray, spread: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """The rule's distance of each setting's (distinct-2, log twin perplexity) to its matched reference's.

    Args:
        own, matched: (S, 2, N) per-prompt values of the S settings and of their matched references.
        spread: (2,) the full-length reference's standard deviation of each axis.
        rows: (B, N) prompt indices of B resamples; None for the prompts as they are.

    Returns:
        (S,) distances, or (S, B) with ``rows``.
    """
    if rows is None:
        rows = np.arange(own.shape[-1])[None]  # (1, N)
    with np.errstate(all="ignore"):
        gap = np.nanmean(own[..., rows], axis=-1) - np.nanmean(matched[..., rows], axis=-1)  # (S, 2, B)
    d = np.sqrt(((gap / spread[None, :, None]) ** 2).sum(axis=1))  # (S, B)
    return d[:, 0] if d.shape[1] == 1 else d


HEADER = [
    "setting",
    "distinct-1",
    "distinct-2 ± SE",
    "distinct-3",
    "repeated 4-grams",
    "twin ppl ± SE",
    "log twin ppl ± SE",
    "tokens",
    "matched ref: distinct-2, log ppl",
    "distance",
    "chosen in resamples",
]


def _row(name: str, f: dict, row: dict | None = None) -> str:
    cells = [
        name,
        f"{f['distinct_1']:.3f}",
        f"{f['distinct_2']:.3f} ± {f['distinct_2_se']:.3f}",
        f"{f['distinct_3']:.3f}",
        f"{f['repeated_4']:.3f}",
        f"{f['twin_ppl']:.1f} ± {f['twin_ppl_se']:.1f}",
        f"{f['twin_log_ppl']:.2f} ± {f['twin_log_ppl_se']:.2f}",
        f"{f['tokens']:.1f}",
    ]
    if row is None:
        cells += ["", "", ""]
    else:
        matched = row["matched_reference"]
        cells += [
            f"{matched['distinct_2']:.3f}, {matched['twin_log_ppl']:.2f}",
            f"{row['distance']:.2f}",
            f"{row['chosen_share']:.0%}",
        ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets/models/demo"), help="the bundle that generates")
    parser.add_argument("--twin", default=str(REPO / "assets/models/demo-dense"), help="the bundle that scores")
    parser.add_argument("--corpus", default=str(REPO / "assets/corpus"), help="its validation split gives the prompts")
    parser.add_argument("--prompts", type=int, default=40, help="validation documents (prompts)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed 1000 * SEED + i")
    _results.add_arguments(parser)
    args = parser.parse_args()

    from core import GREEDY, generate_text, load_bundle, load_corpus

    torch.manual_seed(0)
    bundle = load_bundle(args.model)
    twin = load_bundle(args.twin)
    if twin.tokenizer.get_vocab() != bundle.tokenizer.get_vocab():
        sys.exit(f"{args.twin} has another tokenizer than {args.model}: it cannot score its tokens")
    corpus = load_corpus(args.corpus)
    documents = select_documents(corpus.validation, bundle.tokenizer, args.prompts, args.new_tokens)
    sources = sorted({s for s, _ in documents})
    print(f"{len(documents)} prompts of {PROMPT_TOKENS} tokens from {', '.join(sources)}; {args.new_tokens} new tokens")

    human = [(ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:]) for _, ids in documents]
    reference, reference_per = figures_of(human, twin)
    spread = {name: float(np.std(reference_per[name], ddof=1)) for name in AXES}
    prompts = [bundle.tokenizer.decode(ids[:PROMPT_TOKENS]) for _, ids in documents]

    rows, own, matched = [], [], []
    for settings in grid():
        t0 = time.perf_counter()
        results = [
            generate_text(bundle, prompt, args.new_tokens, seed=1000 * args.seed + i, settings=settings)
            for i, prompt in enumerate(prompts)
        ]
        seconds = time.perf_counter() - t0
        summary, per = figures_of([(r.prompt_ids, r.new_ids) for r in results], twin)
        cut = [(prompt_ids, new_ids[: len(r.new_ids)]) for (prompt_ids, new_ids), r in zip(human, results, strict=True)]
        matched_summary, matched_per = figures_of(cut, twin)
        own.append([per[name] for name in AXES])
        matched.append([matched_per[name] for name in AXES])
        rows.append(
            {
                "label": label(settings),
                "settings": settings.to_json(),
                **summary,
                "matched_reference": {name: matched_summary[name] for name in AXES},
                "seconds": seconds,
                "example": prompts[0] + results[0].text,
            }
        )
        print(f"  {label(settings)}: {seconds:.1f} s", file=sys.stderr, flush=True)

    own_a, matched_a = np.asarray(own, dtype=np.float64), np.asarray(matched, dtype=np.float64)  # (S, 2, N)
    spread_a = np.asarray([spread[name] for name in AXES])
    resamples = np.random.default_rng(0).integers(0, len(documents), size=(RESAMPLES, len(documents)))  # (B, N)
    winners = np.argmin(distances(own_a, matched_a, spread_a, resamples), axis=0)  # (B,)
    for i, (row, d) in enumerate(zip(rows, distances(own_a, matched_a, spread_a), strict=True)):
        row["distance"] = float(d)
        row["chosen_share"] = float(np.mean(winners == i))
    best = min(range(len(rows)), key=lambda i: rows[i]["distance"])  # min keeps the first of ties
    chosen = rows[best]
    print()
    print("| " + " | ".join(HEADER) + " |")
    print("|---|" + "---:|" * (len(HEADER) - 1))
    print(_row("human reference (64 tokens)" if args.new_tokens == 64 else "human reference", reference))
    for row in rows:
        print(_row(("**" + row["label"] + "**") if row is chosen else row["label"], row, row))
    print()
    print(
        "rule: the smallest sqrt(((D2 - D2_ref)/sd_ref(D2))^2 + ((L - L_ref)/sd_ref(L))^2), D2 = mean distinct-2, "
        "L = mean log twin perplexity, _ref: the reference cut to the setting's lengths; "
        f"sd_ref(D2) = {spread['distinct_2']:.3f}, sd_ref(L) = {spread['twin_log_ppl']:.3f} (full-length reference)"
    )
    plain = GREEDY.to_json()
    fields = ", ".join(f"{k}={v!r}" for k, v in chosen["settings"].items() if v != plain[k])
    print(
        f"chosen: {chosen['label']} (distance {chosen['distance']:.2f}; the nearest in "
        f"{chosen['chosen_share']:.0%} of {RESAMPLES:,} bootstrap resamples of the prompts)"
    )
    print(f"core/generation.py: DEFAULT_GENERATION = GenerationSettings({fields})")

    figures = {
        "model": _shown(args.model),
        "twin": _shown(args.twin),
        "prompts": len(documents),
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": args.new_tokens,
        "seed": args.seed,
        "sources": sources,
        "reference": reference,
        "reference_sd": spread,
        "resamples": RESAMPLES,
        "settings": rows,
        "chosen": chosen["settings"],
        "chosen_label": chosen["label"],
        "rule": "smallest distance of (mean distinct-2, mean log twin perplexity) to the human reference's cut to "
        "the same lengths, each axis in units of the full reference's per-document standard deviation",
    }
    _results.emit(_rounded(figures), args, __file__)


def _shown(path: str) -> str:
    """A path inside the checkout relative to it (results files name the same bundles on any machine)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path


def _rounded(value):
    """Floats rounded to 4 decimals, nan as None (JSON has no nan)."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    main()
