"""The sketch search of influence rankings, timed and checked against the float32 search.

A query's rankings (each completion token's, the completion's, and its harmful documents: the
negated completion) search the documents' relative sketches (divided by ||g_D||_A) for their
``--counts`` largest inner products, one request at a time as ``attribute`` makes it. Methods:
the float32 product of every sketch (torch), faiss's exact flat index (what the search used
before), faiss's int8 scalar quantizer refined in float32 over 4 x count (faiss's version of
the shipped method), faiss's HNSW graph (approximate; efSearch max(64, 2 x count)), and the
shipped :class:`CandidateSearch` (an int8 scan through torch's quantized product, then float32
over 4 x count). Prints per method and count the p50 / p95 ms of one request and the recall of
the float32 top, then one JSON line, also written to bench/results/sketch_search[.TAG].json.

    python bench/sketch_search.py --model DIR   # a bundle whose index has an influence store
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="bundle with an influence store (positions or sketch)")
    parser.add_argument("--corpus", default=str(REPO / "assets/corpus"))
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--counts", default="10,100")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hnsw-m", type=int, default=32, help="faiss HNSW: neighbours per node")
    _results.add_arguments(parser)
    args = parser.parse_args()

    import numpy as np
    import torch
    from attribution_speed import held_out_queries

    from core.attribution.decompose import decompose_with_tensors
    from core.attribution.engine import REGISTRY, influence_factors
    from core.attribution.engine import Query as EngineQuery
    from core.attribution.influence.sketch import CandidateSearch
    from core.bundle import load_bundle
    from core.data.corpus import load_corpus
    from core.index.format import load_index

    torch.set_num_threads(args.threads)
    bundle, index = load_bundle(args.model), load_index(args.model)
    factors = influence_factors(index)
    method = REGISTRY["influence"]
    requests = []  # per query: (rows, m) query sketches, as rank_many searches them
    for q in held_out_queries(load_corpus(args.corpus), bundle.tokenizer, args.queries):
        query = EngineQuery(bundle, index, {"influence": factors, "candidates": None, "ranking": "relative"})
        tensors = decompose_with_tensors(bundle, None, q["prompt"], q["completion"], 5, None, 0)
        query.decomposition, query.tensors = tensors
        tokens = method.credit(query)
        span = method.concat(tokens)
        rows = factors.query_sketches([*tokens, span, span]).float()
        rows[-1] *= -1  # harmful: the most negative estimates
        requests.append(rows.numpy())

    searcher = factors.searcher("relative")  # the relative sketches, as the rankings search them
    vectors = searcher.vectors.numpy()
    figures: dict = {"documents": len(vectors), "sketch_width": vectors.shape[1], "queries": len(requests)}
    figures["rows_per_request"] = statistics.fmean(len(r) for r in requests)
    methods = {"float32": None, "shipped": searcher}
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        width, int8 = vectors.shape[1], faiss.ScalarQuantizer.QT_8bit
        quantized = faiss.IndexScalarQuantizer(width, int8, faiss.METRIC_INNER_PRODUCT)
        quantized.train(vectors)
        refined = faiss.IndexRefineFlat(quantized)
        refined.add(vectors)
        t = time.perf_counter()
        graph = faiss.IndexHNSWFlat(width, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = 200
        graph.add(vectors)
        figures["faiss_hnsw_build_s"] = time.perf_counter() - t
        methods.update(faiss_flat=flat, faiss_sq8_refined=refined, faiss_hnsw=graph)
    except ImportError:
        print("faiss is not installed (pip install -r requirements-bench.txt): its rows are left out")
    full = torch.from_numpy(vectors)

    def run(name: str, engine, rows: np.ndarray, count: int) -> np.ndarray:
        if name == "float32":
            return (full @ torch.from_numpy(rows).T).T.topk(count, dim=1).indices.numpy()
        if name == "shipped":
            return engine.search(rows, count)[0]
        if name == "faiss_sq8_refined":
            return engine.search(rows, count, params=faiss.IndexRefineSearchParameters(k_factor=4))[1]
        if name == "faiss_hnsw":
            return engine.search(rows, count, params=faiss.SearchParametersHNSW(efSearch=max(64, 2 * count)))[1]
        return engine.search(rows, count)[1]

    for count in [int(c) for c in args.counts.split(",")]:
        truth = [run("float32", None, rows, count) for rows in requests]
        for name, engine in methods.items():
            run(name, engine, requests[0], count)  # warm-up
            times, recall = [], []
            for rows, top in zip(requests, truth, strict=True):
                t = time.perf_counter()
                found = run(name, engine, rows, count)
                times.append(1000 * (time.perf_counter() - t))
                recall += [len(set(a.tolist()) & set(b.tolist())) / count for a, b in zip(found, top, strict=True)]
            key = f"{name}_top{count}"
            figures[f"{key}_ms_p50"] = statistics.median(times)
            figures[f"{key}_ms_p95"] = float(np.percentile(times, 95))
            figures[f"{key}_recall"] = statistics.fmean(recall)
            figures[f"{key}_recall_min"] = min(recall)
            print(
                f"{name:18s} top {count:4d}: {figures[f'{key}_ms_p50']:.2f} / {figures[f'{key}_ms_p95']:.2f} ms "
                f"(p50 / p95), recall of the float32 top {figures[f'{key}_recall']:.4f} (min {min(recall):.2f}, "
                f"{len(recall)} searches)",
                flush=True,
            )
    figures.update(threads=args.threads, model=str(args.model), prefilter=CandidateSearch.PREFILTER, hnsw_m=args.hnsw_m)
    _results.emit({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, args, __file__)


if __name__ == "__main__":
    main()
