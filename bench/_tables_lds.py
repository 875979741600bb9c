"""The table of bench/lds.py for docs/benchmarks.md (registered in bench/_tables.py's RENDERERS)."""

from __future__ import annotations


def render_lds(f: dict) -> list[str]:
    """bench/lds.py: recall@10, LDS and the counterfactual of every method, with their costs."""
    from _tables import NONE, num, table  # here, not at the top: _tables imports this module

    def pm(key: str, se: str, sign: bool = False) -> str:
        return NONE if f.get(key) is None else f"{num(f[key], 3, sign)} ± {num(f.get(se), 3)}"

    labels = f.get("labels", {})
    rows = []
    for m in f.get("methods", []):
        against = "dense retrains" if f.get(f"{m}_kind") == "dense" else "PRISM retrains"
        recall = f"{num(f.get(f'{m}_recall_verbatim'), 2)} / {num(f.get(f'{m}_recall_paraphrased'), 2)}"
        paired = pm(f"influence_minus_{m}_lds", f"influence_minus_{m}_lds_se", sign=True)
        rows.append(
            [
                labels.get(m, m),
                against,
                recall,
                pm(f"{m}_lds", f"{m}_lds_se"),
                paired,
                pm(f"{m}_cf_delta", f"{m}_cf_se", sign=True),
                num(f.get(f"{m}_single_query_ms"), 1),
                num(f.get(f"{m}_query_ms"), 1),
                num(f.get(f"{m}_bytes_per_document")),
                num(f.get(f"{m}_build_s"), 1),
                num(f.get(f"{m}_peak_rss_mb")),
            ]
        )
    header = ["method", "scored against", "recall@10 verbatim / paraphrased", "LDS ± SE"]
    header += ["influence − method (paired)", "counterfactual Δloss ± SE", "1-query ms", "ms/query (batched)"]
    header += ["bytes/document", "build s", "peak RSS MB"]
    lines = table(header, rows, "llrrrrrrrrr")
    agreement = [
        f"{kind} {num(f[f'{kind}_seed_agreement'], 3)}" for kind in ("prism", "dense") if f"{kind}_seed_agreement" in f
    ]
    by_loss = f"{num(f.get('influence_by_loss_recall_verbatim'), 2)} / "
    by_loss += num(f.get("influence_by_loss_recall_paraphrased"), 2)
    lines += [
        "",
        f"- Corpus: {num(f.get('documents'))} documents ({f.get('facts', NONE)} planted facts x "
        f"{f.get('copies', NONE)} copies), {num(f.get('training_tokens'))} tokens; preset tiny, "
        f"{num(f.get('steps'))} steps (one epoch); retrains: the same recipe, steps in proportion to their tokens.",
        f"- LDS: {f.get('halves', NONE)} random halves x {f.get('seeds', NONE)} training seeds (losses averaged "
        f"over the seeds), {f.get('lds_queries', NONE)} held-out queries of {f.get('prompt_tokens', NONE)} + "
        f"{f.get('completion_tokens', NONE)} tokens; mean ± standard error over queries; the paired difference "
        "only where both are scored against the same retrains. Ground truth "
        f"reproducibility (Spearman of seed 0 vs seed 1 losses over the halves): {', '.join(agreement) or NONE}.",
        f"- Counterfactual: the loss after removing a method's top {f.get('cf_k', NONE)} documents minus after "
        f"removing {f.get('cf_k', NONE)} random ones (retrained, averaged over the seeds), mean ± SE over "
        f"{f.get('cf_queries', NONE)} queries; positive: the removed documents helped.",
        f"- Recall@10 of PRISM influence ranked by loss instead of its default relative score: {by_loss}.",
        f"- Damping: {f.get('damping', NONE)}. PRISM influence rank {f.get('influence_rank', NONE)} "
        + (
            f"with the complement weighted by the damped mean of the dropped eigenvalues, curvature from "
            f"{num(f['influence_curvature_tokens'])} training tokens (as shipped)"
            if "influence_curvature_tokens" in f
            else "with the damped complement 1/lambda (influence format 5), curvature from every training token"
        )
        + "; the baselines score whole documents as windows of 64 tokens, summed.",
        f"- 1-query ms: one query against every document (EK-FAC recomputes every training gradient); "
        f"build s: index, factors or store; peak RSS: the bench process (it held "
        f"{num(f.get('baseline_rss_mb'))} MB before the first method), {f.get('threads', NONE)} torch thread(s).",
    ]
    return lines


def render_lds_ranks(f: dict) -> list[str]:
    """bench/lds_ranks.py: PRISM influence's LDS per inverse rank and complement weight."""
    from _tables import NONE, num, table

    def pm(key: str, sign: bool = False) -> str:
        return NONE if f.get(key) is None else f"{num(f[key], 3, sign)} ± {num(f.get(key + '_se'), 3)}"

    ranks = f.get("ranks", [])
    top = max(ranks) if ranks else None
    rows = [
        [
            num(r) + (" (= 2d: exact)" if r == f.get("two_d") else ""),
            pm(f"rank{r}_mean_lds"),
            pm(f"rank{r}_damping_lds"),
            pm(f"rank{r}_mean_minus_damping", sign=True),
            NONE if r == top else pm(f"rank{r}_minus_rank{top}", sign=True),
            num(f.get(f"rank{r}_build_s"), 1),
        ]
        for r in ranks
    ]
    header = ["rank", "LDS, complement 1/(rho + lambda) (format 6)", "LDS, complement 1/lambda (format 5)"]
    header += ["format 6 − format 5 (paired)", f"− rank {num(top)} (paired, format 6)", "build s"]
    return table(header, rows) + [
        "",
        f"{num(f.get('documents'))} documents, {f.get('lds_queries', NONE)} LDS queries, {f.get('halves', NONE)} "
        f"halves x {f.get('seeds', NONE)} seeds (bench/lds.py's retrains); curvature from "
        f"{num(f.get('curvature_tokens'))} training tokens (as shipped); 2d = {num(f.get('two_d'))}; mean ± "
        "standard error over queries.",
    ]


def render_lds_sketch(f: dict) -> list[str]:
    """bench/lds_sketch.py: the gradient sketch alone per width, beside the exact store and the baselines."""
    from _tables import NONE, num, table

    def pm(key: str, sign: bool = False) -> str:
        return NONE if f.get(key) is None else f"{num(f[key], 3, sign)} ± {num(f.get(key + '_se'), 3)}"

    keys = ["exact", *[str(w) for w in f.get("widths", [])], "ekfac", "logra", "bm25"]
    rows = [
        [
            f.get(f"{key}_label", key),
            num(f.get(f"{key}_bytes_per_document"), 0),
            f"{num(f.get(f'{key}_recall_verbatim'), 2)} / {num(f.get(f'{key}_recall_paraphrased'), 2)}",
            pm(f"{key}_lds"),
            NONE if key == "logra" else pm(f"{key}_minus_logra", sign=True),
        ]
        for key in keys
        if f.get(f"{key}_lds") is not None
    ]
    header = ["method", "bytes/document", "recall@10 verbatim / paraphrased", "LDS ± SE", "− LoGra (paired)"]
    lines = table(header, rows)
    lines += [
        "",
        f"{f.get('documents', NONE)} documents, {f.get('lds_queries', NONE)} LDS queries, {f.get('halves', NONE)} "
        f"halves x {f.get('seeds', NONE)} seeds (bench/lds.py's retrains); sketch widths are prefixes of the "
        f"{f.get('sketch_width_built', NONE)}-wide sketch of one build (4 bytes per coordinate); EK-FAC, LoGra "
        "and BM25 from bench/results/lds.json (same queries and retrains).",
    ]
    return lines
