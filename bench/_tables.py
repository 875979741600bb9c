"""The tables of docs/benchmarks.md: one renderer per bench script, and the demo bundle's own
records. Each renderer takes a results file's flat ``figures`` and returns Markdown lines, with
the precision the bench prints; a figure a run did not produce shows as NONE. Used by
bench/render.py.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

from _tables_explorer import render_explorer
from _tables_generation import render_generation
from _tables_lds import render_lds, render_lds_ranks, render_lds_sketch
from _tables_probes import render_probes

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "assets" / "models" / "demo"
TWIN = REPO / "assets" / "models" / "demo-dense"
NONE = "–"  # a figure this run did not produce

# ----------------------------------------------------------------------------- formatting


def num(value: float | None, decimals: int = 0, sign: bool = False) -> str:
    """``value`` with thousands separators and fixed decimals; NONE when absent."""
    if value is None:
        return NONE
    return f"{value:{'+' if sign else ''},.{decimals}f}"


def pct(value: float | None, decimals: int = 1, sign: bool = False) -> str:
    """A fraction as a percentage."""
    return NONE if value is None else num(100 * value, decimals, sign) + "%"


def times(value: float | None, decimals: int = 0) -> str:
    """A ratio as "1,022x"."""
    return NONE if value is None else num(value, decimals) + "x"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """A Markdown table; ``align`` is one letter per column: l (left) or r (right, default after the first)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in (header, rule, *rows)]


def mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


# ----------------------------------------------------------------------------- one renderer per bench


def render_quality(f: dict) -> list[str]:
    steps, batch = f.get("steps"), f.get("batch_tokens")
    batches = f"{steps} batches" if steps else "batches"
    if batch:
        batches += f" of {batch:,} tokens"
    val = f"validation loss ({f['val_tokens']:,} tokens)" if f.get("val_tokens") else "validation loss"
    return table(
        ["", "PRISM", "dense twin", "PRISM/dense"],
        [
            [val, num(f.get("prism_val_loss"), 3), num(f.get("dense_val_loss"), 3), num(f.get("val_loss_ratio"), 3)],
            ["validation perplexity", num(f.get("prism_val_perplexity"), 1), num(f.get("dense_val_perplexity"), 1), ""],
            [
                f"training tokens/s ({batches}, the same for both)",
                num(f.get("prism_train_tokens_per_s")),
                num(f.get("dense_train_tokens_per_s")),
                num(f.get("throughput_ratio"), 3),
            ],
        ],
    )


def _category_names() -> dict[str, str]:
    """bench/labels.py's share_ key suffix -> category name, from the demo bundle's taxonomy."""
    path = BUNDLE / "index" / "labels.json"
    taxonomy = json.loads(path.read_text(encoding="utf-8")).get("taxonomy", {}) if path.is_file() else {}
    return {c.replace(" & ", "_").replace(" ", "_").lower(): c for c in taxonomy}


def render_labels(f: dict) -> list[str]:
    coherence = num(f.get("mean_coherence"), 3)
    if f.get("coherence_baseline") is not None:
        coherence += f" (random pairs of neighbour states: {num(f['coherence_baseline'], 3)})"
    lines = table(
        ["figure", "value"],
        [
            ["prototypes", num(f.get("prototypes"))],
            ["neighbours per prototype (top-M)", num(f.get("top_m"))],
            ["mean source purity", num(f.get("mean_purity"), 3)],
            ["mean coherence (pairwise cosine of the neighbours' hidden states)", coherence],
            ["mean label confidence", num(f.get("mean_confidence"), 3)],
            ["dead prototypes", pct(f.get("dead_share"))],
            ["re-read contexts that reproduce the indexed trigger token", pct(f.get("token_match"))],
            ["re-read contexts that keep the prototype active", pct(f.get("context_fidelity"))],
            ["labelling time (from labels.json)", num(f.get("label_s")) + " s" if f.get("label_s") else NONE],
        ],
    )
    shares = sorted(((k[len("share_") :], v) for k, v in f.items() if k.startswith("share_")), key=lambda kv: -kv[1])
    if shares:
        names = _category_names()
        lines += [
            "",
            *table(
                ["category", "share of prototypes"],
                [[names.get(key, key.replace("_", " ")), pct(share)] for key, share in shares],
            ),
        ]
    return lines


def render_control(f: dict) -> list[str]:
    lines: list[str] = []
    tasks = [k[: -len("_holdout_items")] for k in f if k.endswith("_holdout_items")]
    if tasks:
        rows = [
            [
                t,
                num(f.get(f"{t}_items")),
                num(f.get(f"{t}_holdout_items")),
                pct(f.get(f"{t}_before")),
                pct(f.get(f"{t}_after")),
                num(f.get(f"{t}_points"), 1, sign=True),
                num(f.get(f"{t}_changed")),
            ]
            for t in tasks
        ]
        lines += table(
            ["task", "items", "held out", "held-out accuracy before", "after", "points", "gains changed"], rows
        )
    behaviours = [k[: -len("_suppressed")] for k in f if k.endswith("_suppressed")]
    if behaviours:
        rows = []
        for b in behaviours:
            other = (
                f"{num(f.get(f'{b}_ppl_other_before'), 2)} -> {num(f.get(f'{b}_ppl_other_after'), 2)} "
                f"({pct(f.get(f'{b}_ppl_other_change'), 2, sign=True)})"
            )
            own = f"{num(f.get(f'{b}_ppl_own_before'), 2)} -> {num(f.get(f'{b}_ppl_own_after'), 2)}"
            rows.append(
                [
                    b,
                    num(f.get(f"{b}_suppressed")),
                    pct(f.get(f"{b}_rate_before")),
                    pct(f.get(f"{b}_rate_after")),
                    pct(f.get(f"{b}_rate_drop"), 0),
                    other,
                    own,
                    num(f.get(f"{b}_kl_neutral"), 3),
                ]
            )
        lines += [""] if lines else []
        lines += table(
            [
                "behaviour",
                "suppressed",
                "rate before",
                "after",
                "drop",
                "val. perplexity, other sources",
                "own source",
                "KL neutral (nats)",
            ],
            rows,
        )
    settings = [
        f"{name} {f[key]}"
        for name, key in (
            ("calibration steps", "steps"),
            ("L1 penalty", "penalty"),
            ("rounds", "rounds"),
            ("prototypes per round", "per_round"),
            ("samples per prompt", "samples"),
            ("tokens per sample", "max_new_tokens"),
            ("perplexity tokens", "ppl_tokens"),
        )
        if key in f
    ]
    if settings:
        lines += ["", "Settings: " + ", ".join(settings) + "."]
    return lines


def render_attribution_speed(f: dict) -> list[str]:
    rows = [
        [
            "PRISM neighbourhood",
            num(f.get("prism_neighbourhood_ms"), 1),
            num(f.get("prism_index_s"), 1),
            num(f.get("prism_neighbourhood_bytes_per_example")),
            num(f.get("prism_neighbourhood_peak_rss_mb")),
            num(f.get("prism_build_peak_rss_mb")),
        ],
        [
            "PRISM influence (every document kept)",
            num(f.get("prism_influence_ms"), 1),
            num(f.get("prism_influence_one_time_s"), 1),
            num(f.get("prism_influence_bytes_per_example")),
            num(f.get("prism_influence_peak_rss_mb")),
            num(f.get("prism_build_peak_rss_mb")),
        ],
        [
            f"EK-FAC (Kronfluence; {f.get('queries', NONE)} queries batched)",
            num(f.get("ekfac_ms"), 1),
            num(f.get("ekfac_fit_s"), 1),
            num(f.get("ekfac_bytes_per_example")),
            num(f.get("ekfac_peak_rss_mb")),
            num(f.get("ekfac_fit_peak_rss_mb")),
        ],
        [
            "LoGra (dattri)",
            num(f.get("logra_ms"), 1),
            num(f.get("logra_fit_s"), 1),
            num(f.get("logra_bytes_per_example")),
            num(f.get("logra_peak_rss_mb")),
            num(f.get("logra_peak_rss_mb")),
        ],
    ]
    lines = table(["method", "ms/query", "one-time s", "bytes/example", "query RSS MB", "one-time RSS MB"], rows)
    lines += [
        "",
        f"- Setup: {num(f.get('candidates'))} candidate examples of {f.get('example_tokens', NONE)} tokens, "
        f"{f.get('queries', NONE)} queries, {f.get('threads', NONE)} threads; curvature fitted on "
        f"{num(f.get('fit_tokens'))} candidate tokens.",
        f"- EK-FAC / PRISM neighbourhood: {times(f.get('ratio_ekfac_vs_neighbourhood'))}; EK-FAC / PRISM "
        f"influence: {times(f.get('ratio_ekfac_vs_influence'))}; LoGra / PRISM influence: "
        f"{times(f.get('ratio_logra_vs_influence'), 2)}.",
        f"- A plain forward pass of a query: {num(f.get('forward_ms'), 1)} ms; neighbourhood / forward "
        f"{num(f.get('neighbourhood_over_forward'), 2)}, influence / forward "
        f"{num(f.get('influence_over_forward'), 2)}.",
    ]
    fractions = sorted({int(m[1]) for k in f if (m := re.match(r"neighbourhood_ms_at_(\d+)pct$", k))})
    if len(fractions) > 1:
        lines += [
            "",
            *table(
                ["share of candidates", "neighbourhood", "influence", "EK-FAC", "LoGra"],
                [
                    [
                        f"{p}%",
                        *(num(f.get(f"{m}_ms_at_{p}pct"), 1) for m in ("neighbourhood", "influence", "ekfac", "logra")),
                    ]
                    for p in fractions
                ],
            ),
        ]
    return lines


def render_attribution_latency(f: dict) -> list[str]:
    if "influence_ms_p50" in f or "neighbourhood_ms_p50" in f:
        return _latency_percentiles(f)
    keys = ("neighbourhood_ms", "influence_ms", "forward_ms", "neighbourhood_over_forward", "influence_over_forward")
    decimals = (1, 1, 1, 2, 2)
    runs = max((len(f[k]) for k in keys if isinstance(f.get(k), list)), default=1)

    def cell(key: str, run: int, d: int) -> str:
        value = f.get(key)
        return num(value[run] if isinstance(value, list) else value if runs == 1 else None, d)

    rows = [[str(r + 1), *(cell(k, r, d) for k, d in zip(keys, decimals, strict=True))] for r in range(runs)]
    lines = table(
        ["run", "neighbourhood ms", "influence ms", "forward ms", "neighbourhood / forward", "influence / forward"],
        rows,
    )
    if f.get("forward_ms_min") is not None:
        lines += ["", f"Forward passes over the runs: {num(f['forward_ms_min'], 1)}-{num(f['forward_ms_max'], 1)} ms."]
    lines += ["", f"Median over {f.get('queries', NONE)} queries of 24 + 8 tokens, {f.get('threads', NONE)} threads."]
    return lines


def _latency_percentiles(f: dict) -> list[str]:
    """One query at a time: attribute() and a forward pass of the same text, p50 / p95."""
    rows = []
    for method in ("influence", "neighbourhood"):
        if f.get(f"{method}_ms_p50") is None:
            continue
        rows.append(
            [
                method,
                f"{num(f[f'{method}_ms_p50'], 1)} / {num(f.get(f'{method}_ms_p95'), 1)}",
                f"{num(f.get(f'{method}_forward_ms_p50'), 1)} / {num(f.get(f'{method}_forward_ms_p95'), 1)}",
                f"{num(f.get(f'{method}_over_forward_p50'), 2)} / {num(f.get(f'{method}_over_forward_p95'), 2)}",
            ]
        )
    lines = table(["method", "attribute ms p50 / p95", "forward ms p50 / p95", "attribute / forward p50 / p95"], rows)
    if f.get("store") is not None:
        scored = (
            "every document by its sketch's estimate"
            if f["store"] == "sketch"
            else (
                f"{f.get('candidates')} candidates from the sketches, scored exactly"
                if f.get("candidates")
                else "every document exactly"
            )
        )
        lines += [
            "",
            f"Influence store: {f['store']} ({num(f.get('documents'), 0)} documents, "
            f"{num(f.get('bytes_per_document'), 0)} bytes per document, sketch width {f.get('sketch_width', NONE)}); "
            f"{scored}.",
        ]
    if f.get("recall_of_exact_top10") is not None:
        lines += [
            "",
            f"Recall of the exact top 10 (every document scored exactly from a position store of the same weights): "
            f"{num(f['recall_of_exact_top10'], 3)} ± {num(f.get('recall_of_exact_top10_se'), 3)}.",
        ]
    queries, threads = f.get("queries", NONE), f.get("threads", NONE)
    lines += ["", f"{queries} queries of 24 + 8 tokens, one at a time, {threads} threads."]
    return lines


def render_attribution_quality(f: dict) -> list[str]:
    names = {"neighbourhood": "PRISM neighbourhood", "influence": "PRISM influence", "ekfac": "EK-FAC (Kronfluence)"}
    rows = [
        [name, num(f.get(f"{m}_recall_at_10"), 2), num(f.get(f"{m}_lds"), 3), num(f.get(f"{m}_ms"), 1)]
        for m, name in names.items()
    ]
    lines = table(["method", "canary recall@10", "LDS", "ms/query (tiny models)"], rows)
    lines += [
        "",
        f"{f.get('facts', NONE)} facts x {f.get('copies', NONE)} copies; LDS over "
        f"{f.get('halves', NONE)} random halves (one seed each), {f.get('lds_queries', NONE)} queries.",
    ]
    return lines


def render_canaries(f: dict) -> list[str]:
    """Planted-fact recall of each attribution method on a freshly generated corpus."""
    methods = [m for m in ("influence", "spans", "neighbourhood") if f"{m}_verbatim_recall_at_10" in f]
    rows = []
    for m in methods:
        for kind in ("verbatim", "paraphrased"):
            key = f"{m}_{kind}"
            ranks = f.get(f"{key}_ranks") or []
            rows.append(
                [
                    m,
                    kind,
                    f"{f.get(f'{key}_hits_at_10', NONE)}/{len(ranks)} ({pct(f.get(f'{key}_recall_at_10'), 0)})",
                    pct(f.get(f"{key}_recall_at_1"), 0),
                    num(f.get(f"{key}_median_rank"), 1),
                    str(f.get(f"{key}_errors", 0)),
                    num(f.get(f"{m}_attribute_s_median"), 2),
                ]
            )
    header = ["method", "prompt", "recall@10", "recall@1", "median rank", "errors", "attribute s (median)"]
    return table(header, rows, "llrrrrr")


def render_influence_retrieval(f: dict) -> list[str]:
    """bench/influence_retrieval.py: the retrieval tier's recall of the exact top 10, and latency."""
    sizes = sorted({int(k.rsplit("_c", 1)[1]) for k in f if k.startswith("attribute_ms_p50_c")} - {0})
    rows = []
    for c in [*sizes, 0]:
        row = [f"{c:,}" if c else "every document (exact)"]
        for column in ("completion", "token"):
            for kind in ("helpful", "harmful"):
                key = f"{column}_{kind}_recall10_c{c}"
                row.append(f"{pct(f[key], 0)} ± {pct(f[key + '_se'], 0)}" if key in f else "100% (exact)")
        row.append(f"{num(f.get(f'attribute_ms_p50_c{c}'))} / {num(f.get(f'attribute_ms_p95_c{c}'))}")
        row.append(f"{num(f.get(f'attribute_over_forward_p50_c{c}'), 1)}")
        rows.append(row)
    header = ["candidates", "completion helpful", "completion harmful", "token helpful", "token harmful"]
    header += ["attribute ms p50 / p95", "forward passes (p50)"]
    lines = table(header, rows, "lrrrrrr")
    lines.append("")
    lines.append(
        f"{num(f.get('documents'))} documents, {num(f.get('positions'))} positions, sketch width "
        f"{num(f.get('sketch_width'))}, {mb(f.get('store_bytes', 0))} ({num(f.get('bytes_per_document'))} bytes per "
        f"document), {f.get('queries')} queries of 24 + 8 tokens; a plain forward pass of the 32 tokens: "
        f"{num(f.get('forward_ms_p50'), 1)} ms (p50). Recall: share of the exact top 10 that the tier returns, "
        "mean ± standard error over queries."
    )
    return lines


def render_sparsity(f: dict) -> list[str]:
    """bench/sparsity.py: how concentrated a bundle's slices are, beside its quality."""
    rows = [
        ["prototypes P, active per token k", f"{num(f.get('num_prototypes'))}, {num(f.get('slices_top_k'))}"],
        [
            "share of the target's absolute slice mass in the largest 1 / 4 / 8 slices",
            " / ".join(pct(f.get(f"slices_top{n}_share")) for n in (1, 4, 8)),
        ],
        [
            "effective k: slices holding 80% of it (median, mean)",
            f"{num(f.get('slices_effective_k_median'))}, {num(f.get('slices_effective_k_mean'), 1)}",
        ],
        [
            f"distinct prototypes per {f.get('window_tokens')}-token window (median)",
            num(f.get("distinct_prototypes_per_window_median")),
        ],
        [
            "validation loss (PRISM / dense twin)",
            f"{num(f.get('prism_val_loss'), 4)} / {num(f.get('dense_val_loss'), 4)}",
        ],
        ["validation loss ratio", num(f.get("val_loss_ratio"), 3)],
        ["training tokens/s ratio PRISM / dense", num(f.get("throughput_ratio"), 3)],
    ]
    lines = table(["", "measured"], rows)
    probed = f"{num(f.get('slices_positions'))} validation positions ({f.get('probe_sequences')} sequences)"
    lines += ["", f"Slices of {probed}."]
    return lines


def render_load(f: dict) -> list[str]:
    """bench/load.py: one row per number of concurrent Steer sessions."""
    counts = sorted(int(m[1]) for key in f if (m := re.fullmatch(r"n(\d+)_requests", key)))
    rows = []
    for n in counts:

        def g(name: str, n: int = n) -> float | None:
            return f.get(f"n{n}_{name}")

        rss_before, rss_after = g("rss_before_mb"), g("rss_after_mb")
        growth = NONE if rss_before is None or rss_after is None else num(rss_after - rss_before, 0, sign=True)
        rows.append(
            [
                str(n),
                num(g("requests")),
                NONE if g("median_s") is None else num(g("median_s"), 2) + " s",
                NONE if g("p95_s") is None else num(g("p95_s"), 2) + " s",
                num(g("errors")),
                f"{num(rss_before)} / {num(rss_after)} MB ({growth})",
                f"{g('load_average_1min_before')} / {g('load_average_1min_after')}",
            ]
        )
    header = ["sessions", "requests", "median", "p95", "errors", "server RSS before / after", "load avg before / after"]
    lines = table(header, rows, "lrrrrrr")
    if f.get("rss_start_mb") is not None:
        lines += [
            "",
            f"Server RSS after start-up and one warm-up request: {num(f['rss_start_mb'])} MB; "
            f"{f.get('requests_per_session', NONE)} regenerations per session; load average (1 min) on "
            f"{f.get('cpu_cores', NONE)} cores at the start / end of the run: {f.get('load_average_1min', NONE)} / "
            f"{f.get('load_average_1min_after', NONE)}.",
        ]
    return lines


def render_sketch_search(f: dict) -> list[str]:
    """bench/sketch_search.py: the sketch search per method and count, one request at a time."""
    names = {
        "float32": "float32 product of every sketch (torch)",
        "faiss_flat": "faiss exact flat index (the previous search)",
        "faiss_sq8_refined": "faiss int8 scalar quantizer, float32 over 4 x count",
        "faiss_hnsw": "faiss HNSW graph (approximate)",
        "shipped": "**int8 scan (torch, fbgemm), float32 over 4 x count (shipped)**",
    }
    counts = sorted({int(k.split("_top")[1].split("_")[0]) for k in f if "_top" in k and k.endswith("_ms_p50")})
    rows = []
    for name, label in names.items():
        for count in counts:
            key = f"{name}_top{count}"
            if f.get(f"{key}_ms_p50") is None:
                continue
            rows.append(
                [
                    label,
                    str(count),
                    f"{num(f[f'{key}_ms_p50'], 2)} / {num(f.get(f'{key}_ms_p95'), 2)}",
                    f"{num(f.get(f'{key}_recall'), 4)} (min {num(f.get(f'{key}_recall_min'), 2)})",
                ]
            )
    lines = table(["search", "count", "ms p50 / p95", "recall of the float32 top"], rows)
    searches = int(f.get("queries", 0) * f.get("rows_per_request", 0))
    return lines + [
        "",
        f"{num(f.get('documents'))} documents, sketch width {f.get('sketch_width', NONE)}; {f.get('queries', NONE)} "
        f"queries, each one request of {num(f.get('rows_per_request'))} searches (its tokens, its completion, its "
        f"harmful documents), {searches:,} searches per count; {f.get('threads', NONE)} threads."
        + (
            f" HNSW: {f.get('hnsw_m', NONE)} neighbours per node, efConstruction 200, efSearch max(64, 2 x count), "
            f"built in {num(f['faiss_hnsw_build_s'], 1)} s."
            if f.get("faiss_hnsw_build_s") is not None
            else ""
        ),
    ]


RENDERERS: dict[str, Callable[[dict], list[str]]] = {
    "canaries": render_canaries,
    "influence_retrieval": render_influence_retrieval,
    "sparsity": render_sparsity,
    "load": render_load,
    "quality": render_quality,
    "labels": render_labels,
    "control": render_control,
    "explorer": render_explorer,
    "attribution_speed": render_attribution_speed,
    "attribution_latency": render_attribution_latency,
    "attribution_quality": render_attribution_quality,
    "lds": render_lds,
    "lds_ranks": render_lds_ranks,
    "lds_sketch": render_lds_sketch,
    "sketch_search": render_sketch_search,
    "probes": render_probes,
    "generation": render_generation,
}

# ----------------------------------------------------------------------------- the demo bundle's records


def _safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file's header (no tensor is read)."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(size)).get("__metadata__", {})


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model*.safetensors"))


def render_bundle() -> list[str]:
    prism = json.loads((BUNDLE / "training.json").read_text())
    twin = json.loads((TWIN / "training.json").read_text()) if (TWIN / "training.json").is_file() else {}
    meta = json.loads((BUNDLE / "index" / "meta.json").read_text())
    influence_file = BUNDLE / "index" / "influence.safetensors"
    influence = json.loads(_safetensors_metadata(influence_file).get("meta", "{}")) if influence_file.is_file() else {}
    config = prism["preset_config"]
    index_bytes = sum(p.stat().st_size for p in (BUNDLE / "index").iterdir() if p.is_file())

    def both(key: str, fmt: Callable[[float], str]) -> list[str]:
        return [
            fmt(prism[key]) if prism.get(key) is not None else NONE,
            fmt(twin[key]) if twin.get(key) is not None else NONE,
        ]

    rows = [
        ["parameters", *both("parameters", lambda v: num(v))],
        ["prototypes, active per token", f"{config['num_prototypes']:,}, k={config['top_k']}", NONE],
        ["training", *both("steps", lambda v: f"{v:,} steps")],
        ["training tokens", *both("train_tokens", lambda v: num(v))],
        [f"validation loss ({prism.get('val_tokens', 0):,} tokens)", *both("val_loss", lambda v: num(v, 3))],
        ["validation perplexity", *both("val_perplexity", lambda v: num(v, 1))],
        ["training wall time", *both("wall_seconds", lambda v: f"{v:,.0f} s")],
        ["training throughput over the run (tokens/s)", *both("tokens_per_second", lambda v: num(v))],
        ["weights (safetensors shards)", mb(_weights_bytes(BUNDLE)), mb(_weights_bytes(TWIN)) if twin else NONE],
    ]
    lines = table(["", "PRISM (`assets/models/demo`)", "dense twin (`assets/models/demo-dense`)"], rows)
    if prism.get("val_loss_ratio") is not None:
        lines += ["", f"Validation loss ratio PRISM / dense twin: {prism['val_loss_ratio']:.3f}."]
    sizes = meta.get("files", {})
    idx = [
        ["training positions indexed", f"{meta['positions']:,} in {meta['sequences']:,} sequences"],
        ["neighbours per prototype (top-M)", num(meta["arguments"]["top_m"])],
        ["neighbour positions, documents they come from", f"{meta['neighbour_positions']:,}, {meta['documents']:,}"],
        ["dead prototypes", num(meta["dead_prototypes"])],
        ["neighbourhood pass", f"{meta['build_seconds']:,.0f} s"],
    ]
    if influence:  # the summary `prism index` registers in meta.json (core/attribution/influence/fit.py)
        idx += [
            ["influence: rank per block, storage", f"{influence['rank']}, {influence['storage']}"],
            ["influence: documents, positions stored", f"{influence['documents']:,}, {influence['positions']:,}"],
            ["influence pass", f"{influence['build_seconds']:,.0f} s"],
        ]
    idx += [["index size (all files)", mb(index_bytes)]]
    idx += [[f"of which `{name}`", mb(size)] for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:3]]
    lines += ["", *table(["index (`assets/models/demo/index`)", "value"], idx)]
    tokens = prism.get("corpus_tokens_by_source") or {}
    if tokens:
        lines += [
            "",
            *table(
                ["source", "training tokens"],
                [
                    *([s, num(n)] for s, n in sorted(tokens.items(), key=lambda kv: -kv[1])),
                    ["all", num(sum(tokens.values()))],
                ],
            ),
        ]
    lines += [
        "",
        f"_From the bundle's own records: `training.json` of both bundles, `index/meta.json` (index built "
        f"{meta['created']}) and the header of `index/influence.safetensors`; file sizes from the "
        f"files. Model fingerprint `{prism.get('model_fingerprint', NONE)}`._",
    ]
    return lines
