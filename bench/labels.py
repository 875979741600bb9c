"""Prototype labels and neighbourhood quality of an indexed bundle, for a person to judge.

Prints the category table, mean source purity of the top-M neighbourhoods, coherence (mean
pairwise cosine of the neighbours' hidden states) against the corpus-wide baseline, the dead
share, and a seeded sample of labelled prototypes with their nearest snippets (the trigger
token in [brackets]). Reads index/labels.json; computes it first when absent or with
--rebuild. Last line: one JSON object, also written to bench/results/labels.json
(bench/_results.py). ``label_s`` is the labelling time recorded in labels.json when the labels
were built, unless this run rebuilt them.

    python bench/labels.py                          # the demo bundle, 20 samples
    python bench/labels.py --model DIR --sample 40 --seed 1 --rebuild
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import _results  # noqa: E402

from core.atlas.labels import build_labels, load_labels, read_labels_file  # noqa: E402
from core.index.format import load_index  # noqa: E402


def one_line(text: str) -> str:
    return " ".join(text.replace("\n", " ⏎ ").split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets" / "models" / "demo"), help="indexed bundle")
    parser.add_argument("--sample", type=int, default=20, help="labelled prototypes to print")
    parser.add_argument("--snippets", type=int, default=3, help="nearest snippets per sampled prototype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--rebuild", action="store_true", help="recompute the labels first")
    _results.add_arguments(parser)
    args = parser.parse_args()

    seconds = None
    labels = None if args.rebuild else load_labels(args.model)
    if labels is None:
        t0 = time.time()
        labels = build_labels(args.model, progress=True)
        seconds = time.time() - t0
    summary = read_labels_file(args.model)["summary"]
    index = load_index(args.model)

    print(f"{'category':<28}{'prototypes':>11}{'share':>8}{'purity':>8}{'coherence':>10}{'confidence':>11}")
    by_category: dict[str, list] = {}
    for label in labels:
        by_category.setdefault(label.category, []).append(label)
    for category, members in sorted(by_category.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        n = len(members)
        print(
            f"{category:<28}{n:>11}{n / len(labels):>8.1%}{sum(m.purity for m in members) / n:>8.3f}"
            f"{sum(m.coherence for m in members) / n:>10.3f}{sum(m.confidence for m in members) / n:>11.3f}"
        )
    print()
    print(f"prototypes {summary['prototypes']}, neighbours per prototype {index.top_m}")
    print(f"mean source purity (top-{index.top_m}) {summary['mean_purity']:.3f}")
    print(
        f"mean coherence {summary['mean_coherence']:.3f} (random pairs of neighbour states: "
        f"{summary['coherence_baseline']:.3f})"
    )
    print(f"dead prototypes {summary['dead']} ({summary['dead_share']:.2%})")
    print(
        f"context fidelity {summary['context_fidelity']:.3f} (share of neighbours whose re-read context "
        f"still activates the prototype); trigger token match {summary['token_match']:.3f}"
    )
    print(f"labelling took {summary['seconds']:.0f} s")

    sample = sorted(random.Random(args.seed).sample(range(len(labels)), min(args.sample, len(labels))))
    print(f"\n{len(sample)} labelled prototypes (seed {args.seed}):")
    for j in sample:
        label = labels[j]
        print(
            f"\n#{j}  {label.category}: {label.role}   (confidence {label.confidence:.2f}, purity "
            f"{label.purity:.2f}, coherence {label.coherence:.2f}, usage {label.usage_share:.2%})"
        )
        print(f"    {label.description}")
        print(f"    promotes: {', '.join(label.promoted[:6])}")
        for record in index.neighbourhood(j)[: args.snippets]:
            text, a, b = record["snippet"], record["highlight_start"], record["highlight_end"]
            shown = one_line(text[max(0, a - 70) : a]) + " [" + one_line(text[a:b]) + "] " + one_line(text[b : b + 30])
            print(f"    - ({record['source']}) {shown}")

    figures = {
        "prototypes": summary["prototypes"],
        "top_m": index.top_m,
        "mean_purity": summary["mean_purity"],
        "mean_coherence": summary["mean_coherence"],
        "coherence_baseline": summary["coherence_baseline"],
        "mean_confidence": summary["mean_confidence"],
        "dead_share": summary["dead_share"],
        "context_fidelity": summary["context_fidelity"],
        "token_match": summary["token_match"],
        "label_s": round(seconds, 1) if seconds is not None else summary["seconds"],
        **{f"share_{c.replace(' & ', '_').replace(' ', '_').lower()}": s for c, s in summary["categories"].items()},
    }
    _results.emit(figures, args, __file__)


if __name__ == "__main__":
    main()
