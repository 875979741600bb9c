"""The table of bench/explorer.py for docs/benchmarks.md (registered in bench/_tables.py's RENDERERS)."""

from __future__ import annotations

STRUCTURE_GROUPS = ("categories", "dominant sources")


def render_explorer(f: dict) -> list[str]:
    """bench/explorer.py: the browser timings, the map-structure scores and issue 17's figures."""
    from _tables import NONE, num, table  # here, not at the top: _tables imports this module

    def s(key: str, decimals: int = 2, scale: float = 1.0) -> str:
        return NONE if f.get(key) is None else num(f[key] * scale, decimals) + " s"

    slider = s("slider_to_64_tokens_s_median", 3)
    if f.get("slider_to_64_tokens_s_min") is not None:
        slider += f" (min {s('slider_to_64_tokens_s_min', 3)})"
    size = NONE if f.get("atlas_16384_json_kb") is None else num(f["atlas_16384_json_kb"]) + " KB"
    tokens = f.get("steered_tokens")  # the sampled default ends at the first end of text
    span = (f"{min(tokens)}" if min(tokens) == max(tokens) else f"{min(tokens)}-{max(tokens)}") if tokens else ""
    steered = f"{span} tokens, sampled" if tokens else "64 greedy tokens"
    rows = [
        ["cold start (`streamlit run` to the Atlas drawn in the browser)", s("cold_start_s")],
        [f"gain slider moved to the regenerated text on screen (median; {steered})", slider],
        ["of which the steered text's generation on the server", s("server_generation_ms", 3, 1e-3)],
        ["64 tokens generated in-process (median)", s("generate_64_ms_median", 3, 1e-3)],
        [
            "Atlas with 16,384 synthetic prototypes drawn (first / later)",
            f"{s('atlas_16384_render_s_first')} / {s('atlas_16384_render_s_median')}",
        ],
        ["its figure: build + JSON on the server, size", f"{s('atlas_16384_build_ms', 3, 1e-3)}, {size}"],
    ]

    def purity(scores: dict | None) -> str:  # categories / dominant sources
        if not scores:
            return NONE
        return " / ".join(NONE if scores.get(g) is None else num(scores[g], 3) for g in STRUCTURE_GROUPS)

    of = "kNN purity (k=10) of categories / of dominant sources"
    if f.get("structure_shipped"):  # issue 17: the map's structure
        rows += [
            [
                f"map structure, the shipped layout ({f['structure_shipped_layout']}): {of}",
                purity(f["structure_shipped"]),
            ],
            [f"map structure, the keys-UMAP baseline (the map before): {of}", purity(f.get("structure_keys_umap"))],
            [
                f"map structure, the same groups shuffled over the points (no structure): {of}",
                purity(f.get("structure_shuffled")),
            ],
        ]
    for c in f.get("structure_candidates") or []:
        rows.append([f"map structure, candidate: {c['layout']}: {of}", purity(c)])
    counts = f.get("lasso_50_browser_counts") or []
    lasso = s("lasso_50_browser_s_median", 3)
    if counts:
        lasso += f", {s('lasso_50_browser_s_max', 3)} ({', '.join(map(str, counts))} selected)"
    edit = s("steer_1000_gains_browser_edit_s_median", 3)
    if f.get("steer_1000_gains_browser_edit_s_max") is not None:
        edit += f", {s('steer_1000_gains_browser_edit_s_max', 3)}"
    if f.get("steer_1000_gains_browser_edit_script_runs"):
        edit += f" ({', '.join(map(str, f['steer_1000_gains_browser_edit_script_runs']))} script runs)"
    rows += [
        [
            f"lasso of 50 with the mouse on the Atlas to cards and table shown ({len(counts)} lassos: median, slowest)",
            lasso,
        ],
        [
            "of which the page's script run, from the browser's running to not-running state (median)",
            s("lasso_50_browser_script_run_s_median", 3),
        ],
        [
            "Steer with 1,000 gains: the controls file loaded to the table and the regenerated text on screen",
            s("steer_1000_gains_browser_load_s", 3),
        ],
        [
            "Steer with 1,000 gains: the page opened from the Atlas to the table and texts on screen (texts cached)",
            s("steer_1000_gains_browser_open_s", 3),
        ],
        ["Steer with 1,000 gains: one gain edited in the table to the regenerated text (median, slowest)", edit],
        [
            "of which the edit's script run, from the browser's running to not-running state (median)",
            s("steer_1000_gains_browser_edit_script_run_s_median", 3),
        ],
        [
            "the edit in the page's clock: Enter to the start of its run (the data editor sends an edit 150 ms "
            "after it) / to the end of the run (medians)",
            f"{s('steer_1000_gains_browser_edit_to_run_start_s_median', 3)} / "
            f"{s('steer_1000_gains_browser_edit_to_run_end_s_median', 3)}",
        ],
        [
            "Steer with 1,000 gains: a pinned gain slider moved to the regenerated text (median)",
            s("steer_1000_gains_browser_slider_s_median", 3),
        ],
        [
            "Steer with 1,000 gains: page open (server-side script run under AppTest, with its regeneration)",
            s("steer_1000_gains_open_s", 3),
        ],
        [
            "Steer with 1,000 gains: one table edit (server-side under AppTest, with its regeneration)",
            s("steer_1000_gains_edit_s", 3),
        ],
        [
            "50 prototypes picked on the Atlas (as a lasso sets them) to table and card (server-side, AppTest)",
            s("lasso_50_cards_s", 3),
        ],
    ]
    rows = [r for r in rows if any(NONE not in cell for cell in r[1:])]
    lines = table(["", "measured"], rows)
    if f.get("load_average_1min") is not None:
        lines += [
            "",
            f"Load average (1 min) before / after: {f['load_average_1min']} / "
            f"{f.get('load_average_1min_after', NONE)}.",
        ]
    return lines
