"""Per-query attribution latency on a bundle and its own index, against a plain forward pass.

The queries are bench/attribution_speed.py's (the first --queries held-out documents with 32
tokens: a prompt of 24 and a completion of 8). Each query is timed alone, as an analyst's one
request: ``attribute()`` as the CLI and the app call it (every completion token's examples, the
completion's, and its harmful documents), right after a plain forward pass of the same 31 tokens,
so that both see the same load; p50 and p95 of each and of their per-query ratio. The influence
store is whatever the bundle's index holds (``--influence-store positions``: exact scores, of
every document or of ``--candidates`` found by the sketches; ``sketch``: every document by its
sketch's estimate). With ``--reference`` (a bundle of the same weights with a position store),
the overall top 10 is compared with the exact top 10 of every document (recall of it). Prints
the figures, then one JSON line, also written to bench/results/attribution_latency[.TAG].json.

    python bench/attribution_latency.py --model DIR [--candidates 100] [--reference DIR]
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
sys.path.insert(0, str(REPO / "bench"))

import _results  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation (numpy's default)."""
    import numpy as np

    return float(np.percentile(values, 100 * q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "assets/models/demo"))
    parser.add_argument("--corpus", default=str(REPO / "assets/corpus"))
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=0, help="position store: documents scored exactly (0: all)")
    parser.add_argument("--reference", help="bundle of the same weights with a position store: exact top 10")
    parser.add_argument("--reference-tops", help="the exact top 10s saved by an earlier run (--save-tops)")
    parser.add_argument("--save-tops", help="write each query's influence top 10 to this JSON file")
    parser.add_argument("--methods", default="influence,neighbourhood")
    _results.add_arguments(parser)
    args = parser.parse_args()

    import torch
    from attribution_speed import held_out_queries

    from core.attribution.engine import attribute, influence_factors
    from core.bundle import load_bundle
    from core.data.corpus import load_corpus
    from core.index.format import load_index

    torch.set_num_threads(args.threads)
    bundle, index = load_bundle(args.model), load_index(args.model)
    methods = args.methods.split(",")
    influence = influence_factors(index) if "influence" in methods else None
    queries = held_out_queries(load_corpus(args.corpus), bundle.tokenizer, args.queries)
    figures: dict = {}
    if influence is not None:
        influence.corpus()  # read once, as a long-running app does
        documents = len(influence.documents)
        figures.update(
            store="positions" if influence.exact else "sketch",
            documents=documents,
            sketch_width=int(influence.meta["sketch_width"]),
            store_bytes=influence.stored_bytes(),
            bytes_per_document=round(influence.stored_bytes() / documents, 1),
            candidates=args.candidates if influence.exact else documents,
        )
    tops: dict[str, list[list[int]]] = {}
    for method in methods:
        options = {"influence": influence, "candidates": args.candidates or None} if method == "influence" else {}
        q0 = queries[0]
        attribute(bundle, index, q0["prompt"], q0["completion"], method=method, **options)  # warm-up
        attribute_ms, forward_ms, tops[method] = [], [], []
        for q in queries:
            ids = torch.tensor([q["prompt_ids"] + q["completion_ids"]])
            with torch.no_grad():
                t = time.perf_counter()
                bundle.model(input_ids=ids[:, :-1])
                forward_ms.append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            result = attribute(bundle, index, q["prompt"], q["completion"], method=method, **options)
            attribute_ms.append(1000 * (time.perf_counter() - t))
            tops[method].append([e.doc_index for e in result.examples[:10]])
        ratio = [a / f for a, f in zip(attribute_ms, forward_ms, strict=True)]
        for name, values in (("ms", attribute_ms), ("forward_ms", forward_ms), ("over_forward", ratio)):
            figures[f"{method}_{name}_p50"] = statistics.median(values)
            figures[f"{method}_{name}_p95"] = percentile(values, 0.95)
        print(
            f"{method}: attribute p50 {figures[f'{method}_ms_p50']:.1f} ms, p95 {figures[f'{method}_ms_p95']:.1f} ms; "
            f"forward p50 {figures[f'{method}_forward_ms_p50']:.1f} ms; attribute / forward p50 "
            f"{figures[f'{method}_over_forward_p50']:.2f}, p95 {figures[f'{method}_over_forward_p95']:.2f}",
            flush=True,
        )
    if args.save_tops and "influence" in tops:
        Path(args.save_tops).write_text(json.dumps(tops["influence"]))
    if args.reference_tops and "influence" in tops:
        truths = json.loads(Path(args.reference_tops).read_text())
        shares = [len(set(t) & set(top)) / max(1, len(t)) for t, top in zip(truths, tops["influence"], strict=True)]
        figures["recall_of_exact_top10"] = statistics.fmean(shares)
        figures["recall_of_exact_top10_se"] = statistics.stdev(shares) / len(shares) ** 0.5
        print(f"recall of the exact top 10: {figures['recall_of_exact_top10']:.3f}")
    elif args.reference and "influence" in tops:
        ref_bundle, ref_index = load_bundle(args.reference), load_index(args.reference)
        reference = influence_factors(ref_index)
        shares = []
        for q, top in zip(queries, tops["influence"], strict=True):
            exact = attribute(
                ref_bundle, ref_index, q["prompt"], q["completion"], method="influence", influence=reference
            )
            truth = {e.doc_index for e in exact.examples[:10]}
            shares.append(len(truth & set(top)) / max(1, len(truth)))
        figures["recall_of_exact_top10"] = statistics.fmean(shares)
        figures["recall_of_exact_top10_se"] = statistics.stdev(shares) / len(shares) ** 0.5
        recall, se = figures["recall_of_exact_top10"], figures["recall_of_exact_top10_se"]
        print(f"recall of the exact top 10: {recall:.3f} +- {se:.3f}")
    figures.update(queries=len(queries), threads=args.threads, model=str(args.model))
    _results.emit({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, args, __file__)


if __name__ == "__main__":
    main()
