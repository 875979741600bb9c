"""The influence retrieval tier against the exact scan, on a bundle's own influence store.

For the first --queries held-out documents with 32 tokens (a prompt of 24, a completion of 8;
the queries of bench/attribution_speed.py), the exact ranking scores every stored document
(``candidates=0``); the retrieval tier scores only the C documents whose gradient sketches
promise most. Per C it prints the share of the exact top 10 that the tier returns (recall@10,
helpful and harmful, over the whole completion and over each token), with its standard error
over queries, and the single-query latency of ``attribute(..., method="influence")`` (p50, p95)
against a plain forward pass of the same 32 tokens. Then one JSON line, also written to
bench/results/influence_retrieval[.TAG].json.

    python bench/influence_retrieval.py --model BUNDLE --corpus CORPUS [--queries 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _results  # noqa: E402


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return mean, se


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "assets/models/demo"))
    parser.add_argument("--corpus", default=str(REPO / "assets/corpus"))
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--candidates", default="50,100,200,400", help="comma-separated C values")
    parser.add_argument("--threads", type=int, default=2)
    _results.add_arguments(parser)
    args = parser.parse_args()

    import torch
    from attribution_speed import held_out_queries

    from core.attribution.decompose import decompose_with_tensors
    from core.attribution.engine import attribute, influence_factors
    from core.attribution.influence import InfluenceCredit
    from core.bundle import load_bundle
    from core.data.corpus import load_corpus
    from core.index.format import load_index

    torch.set_num_threads(args.threads)
    bundle, index = load_bundle(args.model), load_index(args.model)
    factors = influence_factors(index)
    factors.corpus()  # read once, as a long-running app does
    queries = held_out_queries(load_corpus(args.corpus), bundle.tokenizer, args.queries)
    sizes = [int(c) for c in args.candidates.split(",")]
    print(
        f"{args.model}: {len(factors.documents)} documents, {len(factors.store)} positions stored, "
        f"sketch width {factors.sketch.width}; {len(queries)} queries of 24 + 8 tokens"
    )

    recall: dict[str, list[float]] = {}
    for q in queries:
        t = decompose_with_tensors(bundle, None, q["prompt"], q["completion"], 1, None, 16)[1]
        credits = factors.credit(bundle.model, t.hidden, t.ids, t.weights, t.targets, t.gains, t.probs)
        columns = {"completion": InfluenceCredit.concat(credits), "token": credits[len(credits) // 2]}
        for column, credit in columns.items():
            for harmful in (False, True):
                exact = [r.doc_index for r in factors.rank(credit, 10, harmful, candidates=0)]
                for c in sizes:
                    found = {r.doc_index for r in factors.rank(credit, 10, harmful, candidates=c)}
                    key = f"{column}_{'harmful' if harmful else 'helpful'}_recall10_c{c}"
                    recall.setdefault(key, []).append(len(found & set(exact)) / max(1, len(exact)))

    figures: dict[str, float | int] = {}
    for key, values in recall.items():
        figures[key], figures[f"{key}_se"] = _mean_se(values)

    def timed(candidates: int | None) -> list[float]:
        q0 = queries[0]
        attribute(bundle, index, q0["prompt"], q0["completion"], method="influence", candidates=candidates)
        times = []
        for q in queries:
            start = time.perf_counter()
            attribute(bundle, index, q["prompt"], q["completion"], method="influence", candidates=candidates)
            times.append(1000 * (time.perf_counter() - start))
        return times

    forward = []
    with torch.no_grad():
        for q in queries:
            ids = torch.tensor([q["prompt_ids"] + q["completion_ids"]])
            start = time.perf_counter()
            bundle.model(input_ids=ids[:, :-1])
            forward.append(1000 * (time.perf_counter() - start))
    figures["forward_ms_p50"] = statistics.median(forward)
    for c in [*sizes, 0]:
        times = timed(c)
        figures[f"attribute_ms_p50_c{c}"] = statistics.median(times)
        figures[f"attribute_ms_p95_c{c}"] = _percentile(times, 0.95)
        figures[f"attribute_over_forward_p50_c{c}"] = figures[f"attribute_ms_p50_c{c}"] / figures["forward_ms_p50"]
    figures.update(
        queries=len(queries),
        documents=int(len(factors.documents)),
        positions=int(len(factors.store)),
        sketch_width=int(factors.sketch.width),
        store_bytes=int(factors.stored_bytes()),
        bytes_per_document=round(factors.stored_bytes() / max(1, len(factors.documents))),
        threads=args.threads,
    )
    print("recall@10 of the exact top 10 (mean +- SE over queries):")
    for c in sizes:
        parts = []
        for col in ("completion", "token"):
            for kind in ("helpful", "harmful"):
                key = f"{col}_{kind}_recall10_c{c}"
                parts.append(f"{col} {kind} {figures[key]:.2f}+-{figures[key + '_se']:.2f}")
        print(f"  C={c:<5} " + "  ".join(parts))
    print(f"latency, ms p50 / p95 (forward {figures['forward_ms_p50']:.1f}):")
    for c in [*sizes, 0]:
        print(
            f"  C={c:<5} {figures[f'attribute_ms_p50_c{c}']:.1f} / {figures[f'attribute_ms_p95_c{c}']:.1f}"
            f"  ({figures[f'attribute_over_forward_p50_c{c}']:.2f} forward passes)"
        )
    _results.emit({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, args, __file__)


if __name__ == "__main__":
    main()
