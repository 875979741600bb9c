"""PRISM influence's LDS per inverse rank and complement weight, on bench/lds.py's corpus, model,
queries and retrains (run bench/lds.py first: this script only reads its cached retrains).

For each --ranks value the influence store is built (the shipped arguments but the rank) into a
copy of the bench's PRISM model, and every document scored for every LDS query twice: with the
complement weight the build stores, kappa_j = 1/(rho_j + lambda_j) (rho_j: the mean eigenvalue
of the directions left out, influence format 6), and with kappa_j = 1/lambda_j (format 5). The
complement only enters the query's A_j g_q, so swapping it on the loaded factors scores exactly
what a format-5 build would. Prints LDS +- SE per (rank, complement) and paired differences;
last line one JSON object (bench/results/lds_ranks[.TAG].json).

    nice -n 5 python bench/lds_ranks.py --ranks 32,64,96,128
"""

from __future__ import annotations

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

COMPLEMENTS = ("mean", "damping")  # kappa = 1/(rho + lambda) (as built), 1/lambda (format 5)


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / len(values) ** 0.5)


def main() -> None:
    parser = lds.build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--ranks", default="32,64,96,128", help="comma-separated --influence-rank values")
    args = parser.parse_args()
    setup = lds.prepare(args, twin=False)
    import torch

    from core.attribution.influence import InfluenceArguments, build_influence, load_influence
    from core.bundle import load_bundle
    from core.index.format import load_index

    _, masks, actual = lds.ground_truth(setup, ["prism"], args.halves, args.seeds)
    lds_index = np.arange(setup.lds_queries)
    queries = setup.queries[: setup.lds_queries]
    D = len(setup.rows)
    rhos: dict[tuple[int, str], np.ndarray] = {}
    figures: dict = {}
    for rank in (int(r) for r in args.ranks.split(",")):
        bundle_dir = lds.model_copy(setup, f"rank{rank}")
        t0 = time.perf_counter()
        build_influence(bundle_dir, setup.work / "corpus", InfluenceArguments(rank=rank), show_progress=False)
        figures[f"rank{rank}_build_s"] = time.perf_counter() - t0
        bundle, index, factors = load_bundle(bundle_dir), load_index(bundle_dir), load_influence(bundle_dir)
        built = factors.complement
        for complement in COMPLEMENTS:
            damping = torch.from_numpy(np.asarray(factors.damping, dtype=np.float64))
            factors.complement = built if complement == "mean" else (1 / damping).to(built.dtype)
            # w = 1/(sigma + lambda) - kappa, consistent with the complement in use
            sigma = torch.from_numpy(np.asarray(factors.eigenvalues, dtype=np.float64))
            factors.inverse_weights = (1 / (sigma + damping[:, None]) - factors.complement.double()[:, None]).to(
                built.dtype
            )
            scores = np.zeros((len(queries), D))
            for q, query in enumerate(queries):
                examples = methods.overall_examples(bundle, index, factors, "influence", query, 10**6, "loss")
                scores[q, [e.doc_index for e in examples]] = [e.score for e in examples]
            scored = methods.Scored("influence", "", "prism", scores, {}, 0, 0, None, None, 0)
            rho = lds.lds(scored, masks, actual["prism"], lds_index)
            rhos[(rank, complement)] = rho
            mean, se = _mean_se(rho)
            figures[f"rank{rank}_{complement}_lds"], figures[f"rank{rank}_{complement}_lds_se"] = mean, se
            lds.log(f"rank {rank}, complement {complement}: LDS {mean:.3f} +- {se:.3f}")
    print(f"\n{'rank':>5}  " + "  ".join(f"{'kappa ' + c:>18}" for c in COMPLEMENTS) + "  paired mean - damping")
    for rank in sorted({r for r, _ in rhos}):
        cells = [f"{rhos[(rank, c)].mean():.3f} +- {_mean_se(rhos[(rank, c)])[1]:.3f}" for c in COMPLEMENTS]
        diff = _mean_se(rhos[(rank, "mean")] - rhos[(rank, "damping")])
        figures[f"rank{rank}_mean_minus_damping"], figures[f"rank{rank}_mean_minus_damping_se"] = diff
        print(f"{rank:>5}  " + "  ".join(f"{c:>18}" for c in cells) + f"  {diff[0]:+.3f} +- {diff[1]:.3f}")
    top = max(r for r, _ in rhos)
    for rank in sorted({r for r, _ in rhos} - {top}):
        diff = _mean_se(rhos[(rank, "mean")] - rhos[(top, "mean")])
        figures[f"rank{rank}_minus_rank{top}"], figures[f"rank{rank}_minus_rank{top}_se"] = diff
        print(f"rank {rank} - rank {top} (complement mean): {diff[0]:+.3f} +- {diff[1]:.3f}")
    figures.update(
        ranks=sorted({r for r, _ in rhos}),
        lds_queries=setup.lds_queries,
        halves=args.halves,
        seeds=args.seeds,
        documents=D,
        curvature_tokens=InfluenceArguments().curvature_tokens,
        two_d=int(2 * load_bundle(setup.full / f"prism-{setup.steps}").model.prototypes.keys.shape[1]),
    )
    _results.emit({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, args, __file__)


if __name__ == "__main__":
    main()
