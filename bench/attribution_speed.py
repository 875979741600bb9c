"""Attribution speed: PRISM (neighbourhood, influence) against post-hoc baselines on the dense twin.

Same candidate training examples (documents of the demo corpus cut to --length tokens, evenly
spread over the training split) and the same queries (held-out documents: a prompt of 24
tokens and a completion of 8) for every method. Each method runs in its own process so that
its peak RSS is its own (model load included), and the one-time pass runs apart from the
queries, so that "query RSS" is what an attribution process holds:

- PRISM: the index pass on the candidate corpus (neighbourhoods, then influence factors:
  curvature blocks from --fit-tokens sampled positions, a coefficient for every candidate
  document, rank --rank); then, in a fresh process, per-query latency of
  attribute(method="neighbourhood") and attribute(method="influence"), one query at a time;
- EK-FAC (Kronfluence) on the dense twin: factors fitted on the first --fit-tokens tokens of
  the candidates; then, in a fresh process, pairwise scores of all queries against every
  candidate in one batch (its per-query latency is the batch time / queries, which flatters
  it: one query alone pays the whole pass over the candidates' gradients);
- LoGra (dattri) on the dense twin: the gradient store, sized to PRISM's bytes per example.

Also: a plain forward pass of each query on the PRISM model (attribution / forward ratio) and
latency at 25%, 50%, 100% of the candidate set. Prints a table, then one JSON line, also
written to bench/results/attribution_speed.json (bench/_results.py).

    python bench/attribution_speed.py --candidates 8192
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import _results  # noqa: E402


def prepare(args, work: Path) -> dict:
    """Candidate corpora (one per fraction) and queries, written under ``work``."""
    import numpy as np

    from core.bundle import load_bundle
    from core.data.corpus import load_corpus

    bundle = load_bundle(args.model)
    tok = bundle.tokenizer
    corpus = load_corpus(args.corpus)
    train = corpus.train
    picks, ids, seen = [], [], set()
    for i in np.linspace(0, len(train) - 1, args.candidates * 4).round().astype(int).tolist():
        if i in seen:
            continue
        seen.add(i)
        row = train[i]
        tokens = tok(row["text"], add_special_tokens=False)["input_ids"]
        if len(tokens) >= args.length:
            picks.append(i)
            ids.append(tokens[: args.length])
        if len(picks) == args.candidates:
            break
    rng = np.random.default_rng(0)
    order = rng.permutation(len(picks)).tolist()  # nested subsets: 25% in 50% in 100%
    rows = [
        {"id": train[picks[i]]["id"], "text": tok.decode(ids[i]), "source": train[picks[i]]["source"]} for i in order
    ]
    token_ids = [ids[i] for i in order]
    corpora = {}
    for fraction in args.fractions:
        n = max(4, round(len(rows) * fraction))
        path = work / f"candidates-{n}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for row in rows[:n]:
                f.write(json.dumps(row) + "\n")
        corpora[fraction] = {"path": str(path), "n": n}
    return {"corpora": corpora, "token_ids": token_ids, "queries": held_out_queries(corpus, tok, args.queries)}


def held_out_queries(corpus, tok, n: int) -> list[dict]:
    """The first ``n`` validation documents with 32 tokens: a prompt of 24 and a completion of 8."""
    queries = []
    for row in corpus.validation:
        tokens = tok(row["text"], add_special_tokens=False)["input_ids"]
        if len(tokens) >= 32:
            queries.append(
                {
                    "prompt": tok.decode(tokens[:24]),
                    "completion": tok.decode(tokens[24:32]),
                    "prompt_ids": tokens[:24],
                    "completion_ids": tokens[24:32],
                }
            )
        if len(queries) == n:
            break
    return queries


def time_queries(
    bundle, index, influence, queries: list[dict], methods: tuple[str, ...] = ("neighbourhood", "influence")
) -> dict:
    """Median ms per query of attribute() by each of ``methods`` and of a plain forward pass."""
    import torch

    from core.attribution.engine import attribute

    result = {}
    for method in methods:
        q0 = queries[0]
        attribute(bundle, index, q0["prompt"], q0["completion"], method=method, influence=influence)  # warm-up
        times = []
        for q in queries:
            t = time.perf_counter()
            attribute(bundle, index, q["prompt"], q["completion"], method=method, influence=influence)
            times.append(time.perf_counter() - t)
        result[f"{method}_ms"] = 1000 * statistics.median(times)
    forward = []
    with torch.no_grad():
        for q in queries:
            ids = torch.tensor([q["prompt_ids"] + q["completion_ids"]])
            t = time.perf_counter()
            bundle.model(input_ids=ids[:, :-1])
            forward.append(time.perf_counter() - t)
    result["forward_ms"] = 1000 * statistics.median(forward)
    return result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_prism(args, corpus: dict, work: str, out) -> None:
    """PRISM's one-time pass: the index and the influence factors over the candidate corpus."""
    import torch

    from core.attribution.influence import InfluenceArguments, build_influence
    from core.index.build import build_index

    torch.set_num_threads(args.threads)
    bundle_dir = Path(work) / f"prism-{corpus['n']}"
    shutil.copytree(args.model, bundle_dir, ignore=shutil.ignore_patterns("index", ".index-*"))
    # The copy is indexed over the candidate set, not the corpus its model was trained on, which
    # build_index refuses while training.json names that corpus: this timing copy forgets it.
    training = json.loads((bundle_dir / "training.json").read_text())
    training.pop("corpus_fingerprint", None)
    (bundle_dir / "training.json").write_text(json.dumps(training, indent=2))
    t0 = time.perf_counter()
    build_index(bundle_dir, corpus["path"], batch_size=8, show_progress=False)
    t1 = time.perf_counter()
    # Every candidate document is kept (top_documents=None) so that any of them can be scored;
    # the curvature blocks come from a sample of --fit-tokens positions, as EK-FAC's factors do.
    build_influence(
        bundle_dir,
        corpus["path"],
        InfluenceArguments(
            rank=args.rank,
            top_documents=None,
            curvature_tokens=args.fit_tokens,
            curvature_memory_mb=args.curvature_memory_mb,
        ),
        show_progress=False,
    )
    t2 = time.perf_counter()
    out.put(
        {
            "bundle": str(bundle_dir),
            "index_seconds": t1 - t0,
            "influence_seconds": t2 - t1,
            "build_peak_rss_mb": peak_rss_mb(),
        }
    )


def query_prism(args, corpus: dict, queries: list[dict], bundle_dir: str, method: str, out) -> None:
    """Per-query latency of one PRISM method, in a fresh process: its peak RSS is what a user's
    attribution process holds for that method (model and index, plus the influence factors
    for ``influence``), not the build's."""
    import torch

    from core.attribution.influence import load_influence
    from core.bundle import load_bundle
    from core.index.format import load_index

    torch.set_num_threads(args.threads)
    bundle_dir = Path(bundle_dir)
    bundle, index = load_bundle(bundle_dir), load_index(bundle_dir)
    influence = load_influence(bundle_dir) if method == "influence" else None
    index_bytes = sum(f.stat().st_size for f in (bundle_dir / "index").iterdir() if f.name != "influence.safetensors")
    stored = index_bytes + (influence.stored_bytes() if influence is not None else 0)
    out.put(
        {
            "n": corpus["n"],
            f"{method}_bytes_per_example": stored / corpus["n"],
            **time_queries(bundle, index, influence, queries, (method,)),
            f"{method}_peak_rss_mb": peak_rss_mb(),
        }
    )


def run_prism(args, corpus: dict, queries: list[dict], work: str) -> dict:
    build = in_child(build_prism, args, corpus, work)
    neighbourhood = in_child(query_prism, args, corpus, queries, build["bundle"], "neighbourhood")
    influence = in_child(query_prism, args, corpus, queries, build["bundle"], "influence")
    influence.pop("forward_ms")  # the neighbourhood process's forward timing is the one reported
    shutil.rmtree(build.pop("bundle"), ignore_errors=True)
    return {**influence, **neighbourhood, **build}


def _dense_examples(args, token_ids: list, queries: list[dict]):
    from core.attribution.baselines import query_examples, training_examples
    from core.bundle import load_bundle

    dense = load_bundle(args.dense)
    train = training_examples(token_ids)
    query = query_examples(
        [q["prompt_ids"] for q in queries], [q["completion_ids"] for q in queries], dense.tokenizer.eos_token_id
    )
    return dense, train, query


def fit_ekfac(args, token_ids: list, queries: list[dict], factors_dir: str, out) -> None:
    """EK-FAC's one-time pass: factors fitted on the first --fit-tokens tokens of the candidates."""
    import torch
    from torch.utils.data import Subset

    from core.attribution.baselines import ekfac_fit

    torch.set_num_threads(args.threads)
    dense, train, _ = _dense_examples(args, token_ids, queries)
    sample = Subset(train, range(min(len(train), max(1, args.fit_tokens // args.length))))
    seconds = ekfac_fit(dense.model, sample, factors_dir, train_batch_size=8)
    out.put({"fit_seconds": seconds, "fit_examples": len(sample), "fit_peak_rss_mb": peak_rss_mb()})


def score_ekfac(args, token_ids: list, queries: list[dict], factors_dir: str, out) -> None:
    """EK-FAC scores of every query against every candidate, in a fresh process (query-time RSS)."""
    import torch

    from core.attribution.baselines import ekfac_pairwise

    torch.set_num_threads(args.threads)
    dense, train, query = _dense_examples(args, token_ids, queries)
    _, seconds = ekfac_pairwise(
        dense.model, train, query, factors_dir, train_batch_size=8, query_batch_size=len(queries)
    )
    out.put(
        {
            "ms": 1000 * seconds / len(queries),
            "bytes_per_example": 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "n": len(token_ids),
        }
    )


def run_ekfac(args, token_ids: list, queries: list[dict], work: Path) -> dict:
    factors_dir = work / f"ekfac-{len(token_ids)}"
    fit = in_child(fit_ekfac, args, token_ids, queries, str(factors_dir))
    result = in_child(score_ekfac, args, token_ids, queries, str(factors_dir))
    shutil.rmtree(factors_dir, ignore_errors=True)
    return {**result, **fit}


def run_logra(args, token_ids: list, queries: list[dict], proj_dim: int, out) -> None:
    """LoGra: the gradient store of every candidate, then scores; one process, so its peak RSS
    covers both (its store lives in memory)."""
    import torch

    from core.attribution.baselines import logra_scores

    torch.set_num_threads(args.threads)
    dense, train, query = _dense_examples(args, token_ids, queries)
    r = logra_scores(dense.model, train, query, proj_dim=proj_dim, train_batch_size=8, query_batch_size=len(queries))
    out.put(
        {
            "fit_seconds": r.fit_seconds,
            "ms": 1000 * r.score_seconds / len(queries),
            "bytes_per_example": r.bytes_per_example,
            "peak_rss_mb": peak_rss_mb(),
            "n": len(token_ids),
        }
    )


def in_child(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "assets/models/demo"))
    parser.add_argument("--dense", default=str(REPO / "assets/models/demo-dense"))
    parser.add_argument("--corpus", default=str(REPO / "assets/corpus"))
    parser.add_argument("--candidates", type=int, default=96, help="candidate training examples (100%%)")
    parser.add_argument("--length", type=int, default=64, help="tokens per candidate example")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument(
        "--rank", type=int, default=32, help="PRISM influence rank per prototype block (the library's default)"
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--fit-tokens",
        type=int,
        default=65_536,
        help="candidate tokens sampled for the curvature of PRISM influence and of EK-FAC",
    )
    parser.add_argument(
        "--curvature-memory-mb",
        type=int,
        default=256,
        help="PRISM's curvature blocks held at once while building (more passes when smaller)",
    )
    parser.add_argument("--logra-side", type=int, default=32, help="cap on LoGra's per-layer projection side")
    args = parser.parse_args()
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="attribution-speed-"))
    try:
        data = prepare(args, work)
        rows = {}
        for fraction in args.fractions:
            corpus = data["corpora"][fraction]
            n = corpus["n"]
            prism = run_prism(args, corpus, data["queries"], str(work))
            # LoGra's store at PRISM's bytes per example, capped at 32 x 32 per layer: its eFIM
            # preconditioner holds proj_dim^2 floats per layer (10 GB at 99 x 99 on 28 layers).
            side = max(1, int((prism["influence_bytes_per_example"] / 4 / (7 * _layers(args.dense))) ** 0.5))
            side = min(side, args.logra_side)
            logra = in_child(run_logra, args, data["token_ids"][:n], data["queries"], side * side)
            ekfac = run_ekfac(args, data["token_ids"][:n], data["queries"], work)
            rows[fraction] = {"prism": prism, "logra": logra, "ekfac": ekfac}
            print(
                f"[{time.time() - t_start:6.0f} s] {fraction:.0%} ({n} examples) done: {json.dumps(rows[fraction])}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, args, time.time() - t_start)


def _layers(dense_dir: str) -> int:
    return json.loads((Path(dense_dir) / "config.json").read_text())["text_config"]["num_hidden_layers"]


def report(rows: dict, args, wall: float) -> None:
    full = rows[max(rows)]
    p, e, g = full["prism"], full["ekfac"], full["logra"]
    n = p["n"]
    print(
        f"\nAttribution speed, {n} candidate examples of {args.length} tokens, {args.queries} queries, "
        f"{args.threads} threads"
    )
    print(
        f"{'method':<22}{'ms/query':>12}{'one-time s':>12}{'bytes/example':>15}{'query RSS MB':>14}"
        f"{'one-time RSS MB':>17}"
    )
    table = [
        (
            "PRISM neighbourhood",
            p["neighbourhood_ms"],
            p["index_seconds"],
            p["neighbourhood_bytes_per_example"],
            p["neighbourhood_peak_rss_mb"],
            p["build_peak_rss_mb"],
        ),
        (
            "PRISM influence",
            p["influence_ms"],
            p["index_seconds"] + p["influence_seconds"],
            p["influence_bytes_per_example"],
            p["influence_peak_rss_mb"],
            p["build_peak_rss_mb"],
        ),
        (
            "EK-FAC (Kronfluence)",
            e["ms"],
            e["fit_seconds"],
            e["bytes_per_example"],
            e["peak_rss_mb"],
            e["fit_peak_rss_mb"],
        ),
        ("LoGra (dattri)", g["ms"], g["fit_seconds"], g["bytes_per_example"], g["peak_rss_mb"], g["peak_rss_mb"]),
    ]
    for name, ms, fit, per, rss, fit_rss in table:
        print(f"{name:<22}{ms:>12.1f}{fit:>12.1f}{per:>15.0f}{rss:>14.0f}{fit_rss:>17.0f}")
    print(
        f"curvature fitted on {args.fit_tokens:,} candidate tokens ({e['fit_examples']} examples) for EK-FAC and "
        f"PRISM influence; LoGra's store and scores run in one process (one RSS for both)"
    )
    print(
        f"plain forward of a query: {p['forward_ms']:.1f} ms; attribution / forward: neighbourhood "
        f"{p['neighbourhood_ms'] / p['forward_ms']:.2f}, influence {p['influence_ms'] / p['forward_ms']:.2f}"
    )
    print(
        f"EK-FAC / PRISM influence latency: {e['ms'] / p['influence_ms']:.0f}x; "
        f"LoGra / PRISM influence: {g['ms'] / p['influence_ms']:.1f}x; "
        f"EK-FAC / PRISM neighbourhood: {e['ms'] / p['neighbourhood_ms']:.0f}x"
    )
    print("\nscaling (ms/query):")
    print(f"{'examples':>10}{'neighbourhood':>15}{'influence':>12}{'EK-FAC':>12}{'LoGra':>12}")
    for fraction in sorted(rows):
        r = rows[fraction]
        print(
            f"{r['prism']['n']:>10}{r['prism']['neighbourhood_ms']:>15.1f}{r['prism']['influence_ms']:>12.1f}"
            f"{r['ekfac']['ms']:>12.1f}{r['logra']['ms']:>12.1f}"
        )
    figures = {
        "candidates": n,
        "queries": args.queries,
        "example_tokens": args.length,
        "threads": args.threads,
        "prism_neighbourhood_ms": p["neighbourhood_ms"],
        "prism_influence_ms": p["influence_ms"],
        "ekfac_ms": e["ms"],
        "logra_ms": g["ms"],
        "forward_ms": p["forward_ms"],
        "prism_index_s": p["index_seconds"],
        "prism_influence_build_s": p["influence_seconds"],
        "prism_influence_one_time_s": p["index_seconds"] + p["influence_seconds"],
        "ekfac_fit_s": e["fit_seconds"],
        "logra_fit_s": g["fit_seconds"],
        "prism_neighbourhood_bytes_per_example": p["neighbourhood_bytes_per_example"],
        "prism_influence_bytes_per_example": p["influence_bytes_per_example"],
        "ekfac_bytes_per_example": e["bytes_per_example"],
        "logra_bytes_per_example": g["bytes_per_example"],
        "prism_neighbourhood_peak_rss_mb": p["neighbourhood_peak_rss_mb"],
        "prism_influence_peak_rss_mb": p["influence_peak_rss_mb"],
        "ekfac_peak_rss_mb": e["peak_rss_mb"],
        "prism_build_peak_rss_mb": p["build_peak_rss_mb"],
        "ekfac_fit_peak_rss_mb": e["fit_peak_rss_mb"],
        "ekfac_fit_examples": e["fit_examples"],
        "fit_tokens": args.fit_tokens,
        "logra_peak_rss_mb": g["peak_rss_mb"],
        "ratio_ekfac_vs_influence": e["ms"] / p["influence_ms"],
        "ratio_logra_vs_influence": g["ms"] / p["influence_ms"],
        "ratio_ekfac_vs_neighbourhood": e["ms"] / p["neighbourhood_ms"],
        "influence_over_forward": p["influence_ms"] / p["forward_ms"],
        "neighbourhood_over_forward": p["neighbourhood_ms"] / p["forward_ms"],
        "wall_s": wall,
    }
    for fraction in sorted(rows):
        pct = round(100 * fraction)
        for key, value in (
            ("neighbourhood", rows[fraction]["prism"]["neighbourhood_ms"]),
            ("influence", rows[fraction]["prism"]["influence_ms"]),
            ("ekfac", rows[fraction]["ekfac"]["ms"]),
            ("logra", rows[fraction]["logra"]["ms"]),
        ):
            figures[f"{key}_ms_at_{pct}pct"] = value
    _results.emit({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, args, __file__)


if __name__ == "__main__":
    main()
