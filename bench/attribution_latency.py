"""Per-query attribution latency on a shipped bundle and its own index, against a plain forward.

The queries are the first --queries held-out documents of the corpus with at least 32 tokens:
a prompt of 24 tokens and a completion of 8, as in bench/attribution_speed.py. Prints the
median ms per query of attribute(method=neighbourhood), attribute(method=influence) and a
plain forward pass of the same tokens, and their ratios, then one JSON line.

    python bench/attribution_latency.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "assets/models/demo"))
    parser.add_argument("--corpus", default=str(REPO / "assets/corpus"))
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from core.attribution import attribute
    from core.bundle import load_bundle
    from core.data import load_corpus
    from core.index import load_index
    from core.influence import load_influence

    torch.set_num_threads(args.threads)
    bundle, index, influence = load_bundle(args.model), load_index(args.model), load_influence(args.model)
    influence.corpus()  # read once, as a long-running app does
    tok = bundle.tokenizer
    queries = []
    for row in load_corpus(args.corpus).validation:
        ids = tok(row["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= 32:
            queries.append((tok.decode(ids[:24]), tok.decode(ids[24:32]), ids[:32]))
        if len(queries) == args.queries:
            break
    figures = {}
    for method in ("neighbourhood", "influence"):
        attribute(bundle, index, queries[0][0], queries[0][1], method=method, influence=influence)  # warm-up
        times = []
        for prompt, completion, _ in queries:
            t = time.perf_counter()
            attribute(bundle, index, prompt, completion, method=method, influence=influence)
            times.append(time.perf_counter() - t)
        figures[f"{method}_ms"] = 1000 * statistics.median(times)
    times = []
    with torch.no_grad():
        for *_, ids in queries:
            t = time.perf_counter()
            bundle.model(input_ids=torch.tensor([ids[:-1]]))
            times.append(time.perf_counter() - t)
    figures["forward_ms"] = 1000 * statistics.median(times)
    for method in ("neighbourhood", "influence"):
        figures[f"{method}_over_forward"] = figures[f"{method}_ms"] / figures["forward_ms"]
    print(f"{args.model}: {len(queries)} queries of 24 + 8 tokens, {args.threads} threads, median ms per query")
    print(f"  neighbourhood {figures['neighbourhood_ms']:.1f}  influence {figures['influence_ms']:.1f}  "
          f"forward {figures['forward_ms']:.1f}")
    print(f"  attribution / forward: neighbourhood {figures['neighbourhood_over_forward']:.2f}, "
          f"influence {figures['influence_over_forward']:.2f}")
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
