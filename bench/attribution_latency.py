"""Per-query attribution latency on a shipped bundle and its own index, against a plain forward.

The queries and the timing are those of bench/attribution_speed.py (the first --queries
held-out documents with 32 tokens: a prompt of 24 and a completion of 8; median ms per query),
but against the bundle's own index and factors instead of one rebuilt on a candidate set.
Prints the medians and their ratios, then one JSON line, also written to
bench/results/attribution_latency.json (bench/_results.py).

    python bench/attribution_latency.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "assets/models/demo"))
    parser.add_argument("--corpus", default=str(REPO / "assets/corpus"))
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    _results.add_arguments(parser)
    args = parser.parse_args()

    import torch
    from attribution_speed import held_out_queries, time_queries

    from core.attribution.engine import influence_factors
    from core.bundle import load_bundle
    from core.data.corpus import load_corpus
    from core.index.format import load_index

    torch.set_num_threads(args.threads)
    bundle, index = load_bundle(args.model), load_index(args.model)
    influence = influence_factors(index)
    influence.corpus()  # read once, as a long-running app does
    queries = held_out_queries(load_corpus(args.corpus), bundle.tokenizer, args.queries)
    figures = time_queries(bundle, index, influence, queries)
    for method in ("neighbourhood", "influence"):
        figures[f"{method}_over_forward"] = figures[f"{method}_ms"] / figures["forward_ms"]
    print(f"{args.model}: {len(queries)} queries of 24 + 8 tokens, {args.threads} threads, median ms per query")
    print(
        f"  neighbourhood {figures['neighbourhood_ms']:.1f}  influence {figures['influence_ms']:.1f}  "
        f"forward {figures['forward_ms']:.1f}"
    )
    print(
        f"  attribution / forward: neighbourhood {figures['neighbourhood_over_forward']:.2f}, "
        f"influence {figures['influence_over_forward']:.2f}"
    )
    figures.update(queries=len(queries), threads=args.threads)
    _results.emit({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, args, __file__)


if __name__ == "__main__":
    main()
