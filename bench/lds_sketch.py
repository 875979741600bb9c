"""The gradient sketch alone as an attribution method: LDS and recall per sketch width, on
bench/lds.py's corpus, model, queries and retrains (run bench/lds.py first: this script only
reads its cached retrains and its results for the baselines).

Every document's stored sketch is a random projection of its whitened prototype-block
gradient, sum_j rho_j * (R A_j^{1/2} g_jD) (core/attribution/influence/sketch.py), so its inner
product with a query's sketch is an unbiased estimate of the exact influence I(q, D): a gradient
store in the manner of LoGra or TRAK, but of the prototype blocks, with the exact block inverse
folded in. A store of only these sketches costs 4 m bytes per document. The influence store is
built once with the shipped arguments (m = 2,048); a width m' < m is its first m' coordinates
(R's rows and the signs are independent draws, so a prefix is an m'-wide sketch). Per width:
LDS (loss estimate) and recall@10 of the planted facts (estimate / ||g_D||_A, the default
relative ranking), next to the exact scores of the same store and to the baselines of
bench/results/lds.json (same queries and retrains; paired differences per query). Last line
one JSON object (bench/results/lds_sketch[.TAG].json).

    nice -n 5 python bench/lds_sketch.py --widths 256,512,1024,2048
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _lds_methods as methods  # noqa: E402
import _results  # noqa: E402
import lds  # noqa: E402

BASELINES = ("ekfac", "logra", "bm25")  # rows of bench/results/lds.json shown beside


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / len(values) ** 0.5)


def whole_credit(bundle, index, factors, query):
    """The credit of a query's whole completion, by the engine's own steps."""
    from core.attribution.decompose import decompose_with_tensors
    from core.attribution.engine import REGISTRY
    from core.attribution.engine import Query as EngineQuery

    chosen = REGISTRY["influence"]
    q = EngineQuery(bundle, index, {"influence": factors, "candidates": None, "ranking": "loss"})
    q.decomposition, q.tensors = decompose_with_tensors(bundle, None, query.prompt, query.completion, 5, None, 16)
    return chosen.concat(chosen.credit(q))


def main() -> None:
    parser = lds.build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--widths", default="128,256,512,1024,2048", help="comma-separated sketch widths m'")
    parser.add_argument("--baselines", default=str(REPO / "bench" / "results" / "lds.json"))
    args = parser.parse_args()
    setup = lds.prepare(args, twin=False)

    from core.attribution.influence import InfluenceArguments, build_influence, load_influence
    from core.bundle import load_bundle
    from core.index.format import load_index

    _, masks, actual = lds.ground_truth(setup, ["prism"], args.halves, args.seeds)
    lds_index = np.arange(setup.lds_queries)
    D = len(setup.rows)
    bundle_dir = lds.model_copy(setup, "sketch")
    t0 = time.perf_counter()
    build_influence(bundle_dir, setup.work / "corpus", InfluenceArguments(), show_progress=False)
    build_s = time.perf_counter() - t0
    bundle, index, factors = load_bundle(bundle_dir), load_index(bundle_dir), load_influence(bundle_dir)
    sketches = np.asarray(factors._sketches, dtype=np.float64)  # (stored documents, m)
    rows = np.asarray(factors.documents)  # training row of each stored document
    norm = factors.gradient_norm
    widths = [int(w) for w in args.widths.split(",")]
    if max(widths) > sketches.shape[1]:
        raise SystemExit(f"the store's sketches have {sketches.shape[1]} coordinates; --widths asks for more")

    exact = np.zeros((len(setup.queries), D))
    estimate = {w: np.zeros((len(setup.queries), D)) for w in widths}
    relative = {w: np.zeros((len(setup.queries), D)) for w in ["exact", *widths]}
    safe = np.where(norm > 0, norm, np.inf)
    for q, query in enumerate(setup.queries):
        credit = whole_credit(bundle, index, factors, query)
        scores, _ = factors.exact_scores(credit)
        exact[q, rows] = scores
        relative["exact"][q, rows] = scores / safe
        phi = factors.query_sketches([credit])[0].double().numpy()
        for w in widths:
            value = sketches[:, :w] @ phi[:w]
            estimate[w][q, rows] = value
            relative[w][q, rows] = value / safe
    id_row = {r["id"]: i for i, r in enumerate(setup.rows)}
    copies = {f.fact: {id_row[d] for d in f.doc_ids} for f in setup.facts}

    def scored(scores: np.ndarray, ranked: np.ndarray) -> methods.Scored:
        return methods.Scored("", "", "prism", scores, {"": methods.by_score(ranked)}, 0, 0, None, None, 0)

    baselines = json.loads(Path(args.baselines).read_text())["figures"] if Path(args.baselines).is_file() else {}
    figures: dict = {"build_s": build_s, "store_bytes_per_document": factors.stored_bytes() / D}
    rhos = {"exact": lds.lds(scored(exact, relative["exact"]), masks, actual["prism"], lds_index)}
    recalls = {"exact": lds.recall_at_10(scored(exact, relative["exact"]), "", setup.queries, copies)}
    for w in widths:
        s = scored(estimate[w], relative[w])
        rhos[w] = lds.lds(s, masks, actual["prism"], lds_index)
        recalls[w] = lds.recall_at_10(s, "", setup.queries, copies)
    for name in BASELINES:
        if f"{name}_lds_per_query" in baselines:
            rhos[name] = np.asarray(baselines[f"{name}_lds_per_query"])
    header = f"{'method':<34}{'bytes/doc':>10}{'recall@10 v/p':>15}{'LDS +- SE':>16}{'- LoGra (paired)':>19}"
    print("\n" + header)
    for key, rho in rhos.items():
        if isinstance(key, int):
            label, size = f"PRISM sketch, m = {key}", 4 * key
        elif key == "exact":
            label, size = "PRISM influence, exact (same store)", figures["store_bytes_per_document"]
        else:
            label, size = baselines.get("labels", {}).get(key, key), baselines.get(f"{key}_bytes_per_document", 0)
        recall = recalls.get(key) or {
            "verbatim": baselines.get(f"{key}_recall_verbatim"),
            "paraphrased": baselines.get(f"{key}_recall_paraphrased"),
        }
        mean, se = _mean_se(rho)
        paired = ""
        if "logra" in rhos and key != "logra" and len(rho) == len(rhos["logra"]):
            diff = _mean_se(rho - rhos["logra"])
            paired = f"{diff[0]:+.3f} +- {diff[1]:.3f}"
            figures[f"{key}_minus_logra"], figures[f"{key}_minus_logra_se"] = diff
        rec = "/".join("-" if recall[k] is None else f"{recall[k]:.2f}" for k in ("verbatim", "paraphrased"))
        print(f"{label:<34}{size:>10,.0f}{rec:>15}{f'{mean:.3f} +- {se:.3f}':>16}{paired:>19}")
        figures.update(
            {
                f"{key}_label": label,
                f"{key}_bytes_per_document": size,
                f"{key}_lds": mean,
                f"{key}_lds_se": se,
                f"{key}_recall_verbatim": recall["verbatim"],
                f"{key}_recall_paraphrased": recall["paraphrased"],
            }
        )
    figures.update(
        widths=widths,
        lds_queries=setup.lds_queries,
        halves=args.halves,
        seeds=args.seeds,
        documents=D,
        sketch_width_built=int(sketches.shape[1]),
    )
    _results.emit({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, args, __file__)


if __name__ == "__main__":
    main()
