"""Explorer speed on this machine: cold start, slider-to-regenerated-text, a 16,384-point atlas.

    python bench/explorer.py [--model assets/models/demo] [--repeats 5]

Measures, with headless Chromium (Debian's, software WebGL) driving `streamlit run`:
- cold start: from launching `streamlit run explorer/app.py` on the bundle to the Atlas map
  drawn in the browser (server start, model and index load, page render);
- Steer runs with its default generation settings (sampled, seeded), up to 64 tokens per text:
  a text ends at its first end of text, so the number of tokens is recorded with the times;
- slider -> 64 tokens: on Steer, a gain slider moved with the keyboard until the regenerated
  64-token steered text (and its perplexities) is on screen; new controls each time, so
  nothing comes from the cache;
- lasso of 50: on the Atlas (default lasso drag mode) a lasso drawn with the mouse around
  exactly 50 points (a circle with a gap of a few pixels between the 50th and 51st nearest
  points) until "Selection: 50 prototypes", the first card and the selection table are on
  screen; the count the page reports is kept with the time;
- Steer with 1,000 gains: a controls file of 1,000 gains uploaded on Steer until the table and
  the steered text are on screen; the page opened again from the Atlas (its texts cached); one
  gain edited in the table (double-click, type, Enter) and one pinned slider moved, each until
  the regenerated text is on screen;
- atlas 16,384: a page drawing explorer.figures.atlas_figure with 16,384 synthetic prototypes,
  from navigation to the WebGL map drawn; plus the server-side figure build and JSON size.
And in-process (no browser): generate_text of 64 tokens under a controls change, median; issue
17's server-side figures (see ``audit``: the map-structure scores of the shipped layout, of the
keys-UMAP baseline, of a shuffled baseline and of every candidate layout; Steer with 1,000 gains
and 50 prototypes picked under Streamlit's AppTest), alone with
`python bench/explorer.py --audit-only --results-tag audit`. Steer with 1,000 gains alone,
server-side and in the browser (no results file written): `python bench/explorer.py --steer-only`.

Every wait for the end of a script run checks on each animation frame (``_browser.idle``): Playwright's
own waits check every 500 ms after the first few, which added up to 0.5 s to the timings before.
A table edit is also split in the page's clock: Enter to the start of its run (Streamlit's data
editor sends an edit 150 ms after it) and to the end of the run.

Prints a table, then one JSON line, also written to bench/results/explorer.json
(bench/_results.py). Without Chromium or playwright only the in-process figures are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import _results  # noqa: E402
from _browser import (  # noqa: E402
    KEY_WATCH,
    RUN_WATCH,
    edit_phases,
    has_browser,
    idle,
    launch,
    pin_slider,
    script_run,
    script_runs,
    wait_for_run,
)
from _streamlit import start_streamlit  # noqa: E402

ATLAS_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import numpy as np
import streamlit as st
from explorer.figures import atlas_figure
rng = np.random.default_rng(0)
P = 16384
groups = rng.choice(["literature", "dictionary", "software", "python", "quotations", "names"], P).tolist()
fig = atlas_figure(rng.normal(size=(P, 2)), np.arange(P), groups, rng.random(P),
                   hover=[f"prototype {{j}}" for j in range(P)])
st.plotly_chart(fig, key="map", on_select="rerun", selection_mode=("points", "box", "lasso"))
st.write("drawn")
"""


def thousand_gains(num_prototypes: int) -> dict[int, float]:
    """1,000 gains (fewer on a smaller model), none of them 1 (a gain of 1 is no control)."""
    values = (0.5, 0.75, 1.25, 1.5, 1.75, 2.0, 2.5)
    return {j: values[j % len(values)] for j in range(min(1000, num_prototypes))}


# A lasso around exactly n points: the point whose n-th and (n+1)-th nearest neighbours (itself
# first) are the farthest apart, away from the centres already used; a circle between the two.
LASSO_CIRCLE = """([n, used]) => {
  const gd = document.querySelector('.stPlotlyChart .js-plotly-plot');
  const t = gd._fullData[0], L = gd._fullLayout;
  const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
  const pts = Array.from(t.x, (x, i) => [r.left + L.xaxis.l2p(x), r.top + L.yaxis.l2p(t.y[i])]);
  let best = null;
  for (const [cx, cy] of pts) {
    const d = pts.map(([x, y]) => Math.hypot(x - cx, y - cy)).sort((a, b) => a - b);
    const gap = d[n] - d[n - 1], rad = (d[n] + d[n - 1]) / 2;
    if (cx - rad < r.left + 4 || cx + rad > r.right - 4 || cy - rad < r.top + 4 || cy + rad > r.bottom - 4) continue;
    if (used.some(([ux, uy, ur]) => Math.hypot(ux - cx, uy - cy) < ur + rad)) continue;
    if (!best || gap > best.gap) best = {x: cx, y: cy, r: rad, gap: gap};
  }
  return best;
}"""


def lasso_50(page, repeats: int) -> dict:
    """On the Atlas: lasso 50 points with the mouse; seconds from the release to cards and table on screen."""
    times, counts, runs, used = [], [], [], []
    for _ in range(repeats):
        circle = page.evaluate(LASSO_CIRCLE, [50, used])
        if circle is None:
            raise RuntimeError(f"no room on the map for lasso {len(used) + 1} around 50 points")
        used.append([circle["x"], circle["y"], circle["r"]])
        corners = 72  # inscribed polygon: within 0.1% of the circle
        path = [
            (circle["x"] + circle["r"] * math.cos(a), circle["y"] + circle["r"] * math.sin(a))
            for a in (2 * math.pi * k / corners for k in range(corners + 1))
        ]  # closed where it began, as a hand does
        page.evaluate(RUN_WATCH)
        page.mouse.move(*path[0])
        page.mouse.down()
        for x, y in path[1:]:
            page.mouse.move(x, y, steps=2)
        t0 = time.perf_counter()
        page.mouse.up()
        selection = page.get_by_text(re.compile(r"^Selection: [\d,]+ prototypes?$"))
        selection.wait_for()
        page.get_by_role("heading", name=re.compile(r"Prototype \d+")).first.wait_for()
        page.locator("[data-testid=stDataFrame]:visible").first.wait_for()
        times.append(time.perf_counter() - t0)
        counts.append(int(re.sub(r"\D", "", selection.inner_text())))
        idle(page)
        runs.append(script_run(page))
        page.get_by_role("button", name="Clear selection").click()
        page.get_by_text("No prototype selected yet", exact=False).wait_for()
        idle(page)
    return {
        "lasso_50_browser_s_median": round(statistics.median(times), 3),
        "lasso_50_browser_s_max": round(max(times), 3),
        "lasso_50_browser_counts": counts,
        "lasso_50_browser_script_run_s_median": statistics.median(r for r in runs if r is not None)
        if any(r is not None for r in runs)
        else None,
    }


def steer_many_gains(page, folder: Path, num_prototypes: int, repeats: int) -> dict:
    """Steer with 1,000 gains in the browser: upload, page open, table edits and a slider move."""
    from core import Controls

    gains = thousand_gains(num_prototypes)
    file = folder / "gains-1000.json"
    file.write_text(json.dumps(Controls(gains=gains).to_json()))
    rows = re.compile(rf"^{len(gains):,} rows of {len(gains):,} ")
    out: dict = {"steer_1000_gains_browser_count": len(gains)}
    page.evaluate(RUN_WATCH)
    t0 = time.perf_counter()
    page.get_by_test_id("stFileUploader").locator("input[type=file]").set_input_files(file)
    page.get_by_text(rows).wait_for()
    page.get_by_text(re.compile(r"^First difference at token|^The controls did not change")).wait_for()
    idle(page)
    out["steer_1000_gains_browser_load_s"] = round(time.perf_counter() - t0, 3)

    page.get_by_test_id("stTopNavLink").filter(has_text="Atlas").click()
    page.locator(".js-plotly-plot .nsewdrag").first.wait_for()
    idle(page)
    page.evaluate(RUN_WATCH)
    t0 = time.perf_counter()
    page.get_by_test_id("stTopNavLink").filter(has_text="Steer").click()
    page.get_by_text(rows).wait_for()
    page.locator("[data-testid=stDataFrame]:visible").first.wait_for()
    page.get_by_text(re.compile(r"^Original: .*\. Steered: ")).wait_for()
    out["steer_1000_gains_browser_open_s"] = round(time.perf_counter() - t0, 3)
    idle(page)
    out["steer_1000_gains_browser_open_script_run_s"] = script_run(page)

    edits, runs, counts, phases = [], [], [], []
    for r in range(min(repeats, 6)):  # rows 0-5: the sidebar's summary names them
        table = page.locator("[data-testid=stDataFrame]:visible").first
        table.evaluate("e => e.scrollIntoView({block: 'center'})")  # below pinned slider rows, maybe
        time.sleep(0.3)
        grid = table.bounding_box()
        # the gain column of row r, at the bench's 1,400 px viewport (checked: its editor opens on its value)
        page.mouse.dblclick(grid["x"] + 651, grid["y"] + 35 * (r + 1) + 17)
        editor = page.locator("input.gdg-input")
        editor.wait_for(timeout=20_000)
        if float(editor.input_value()) != gains[r]:
            raise RuntimeError(f"the editor opened on {editor.input_value()!r}, not row {r}'s gain {gains[r]}")
        value = f"{2.75 - 0.05 * r:g}"
        page.evaluate(RUN_WATCH)
        page.evaluate(KEY_WATCH)
        time.sleep(0.3)  # the grid's editor takes keys a moment after it shows
        page.keyboard.type(value)
        time.sleep(0.3)  # and commits on Enter what it has taken in by then
        t0 = time.perf_counter()
        page.keyboard.press("Enter")
        page.get_by_test_id("stSidebar").get_by_text(f"#{r}×{value}").wait_for()
        idle(page)  # the regenerated text (one run: the table's on_change commits the edit first)
        edits.append(time.perf_counter() - t0)
        runs.append(script_run(page))
        counts.append(script_runs(page))
        phases.append(edit_phases(page))
    out["steer_1000_gains_browser_edit_s_median"] = round(statistics.median(edits), 3)
    out["steer_1000_gains_browser_edit_script_runs"] = counts  # per edit: 1 since the on_change commit
    out["steer_1000_gains_browser_edit_s_max"] = round(max(edits), 3)
    out["steer_1000_gains_browser_edit_script_run_s_median"] = statistics.median(r for r in runs if r is not None)
    seen = [p for p in phases if p is not None]
    if seen:  # in the page's clock: Enter to the run's start (the editor sends an edit 150 ms after it) and end
        out["steer_1000_gains_browser_edit_to_run_start_s_median"] = statistics.median(p[0] for p in seen)
        out["steer_1000_gains_browser_edit_to_run_end_s_median"] = statistics.median(p[1] for p in seen)

    pin_slider(page, 5)  # focused: the arrow keys below move it
    moves = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        page.keyboard.press("ArrowLeft")  # new controls each time: nothing from the cache
        wait_for_run(page)
        moves.append(time.perf_counter() - t0)
    out["steer_1000_gains_browser_slider_s_median"] = round(statistics.median(moves), 3)
    return out


def in_process(model: str, repeats: int) -> dict:
    import torch

    from core.bundle import load_bundle
    from core.control.controls import Controls
    from core.generation import GREEDY, generate_text

    torch.set_num_threads(int(os.environ.get("PRISM_EXPLORER_THREADS", "1")))  # as the app does
    bundle = load_bundle(model)
    generate_text(bundle, "KING.", max_new_tokens=64, settings=GREEDY)  # warm up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        generate_text(bundle, "KING.", max_new_tokens=64, controls=Controls(gains={r: 0.5}), settings=GREEDY)
        times.append(time.perf_counter() - t0)
    return {
        "generate_64_ms_median": round(1000 * statistics.median(times), 1),
        "generate_64_ms_min": round(1000 * min(times), 1),
        "torch_threads": torch.get_num_threads(),
        "num_prototypes": bundle.model.config.num_prototypes,
    }


def in_browser(model: str, repeats: int, num_prototypes: int, steer_only: bool = False) -> dict:
    """The browser timings; with ``steer_only`` only the cold start and Steer with 1,000 gains."""
    from playwright.sync_api import sync_playwright

    results: dict = {}
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(300_000)

        t0 = time.perf_counter()
        process, url = start_streamlit(REPO / "explorer" / "app.py", ["--model", model])
        try:
            page.goto(url)
            page.locator(".js-plotly-plot .nsewdrag").first.wait_for()
            results["cold_start_s"] = round(time.perf_counter() - t0, 2)
            idle(page)
            if not steer_only:
                results |= lasso_50(page, max(2, repeats // 2))
            page.get_by_test_id("stTopNavLink").filter(has_text="Steer").click()
            page.get_by_text("No controls in force").wait_for()
            idle(page)
            times = []
            for r in range(0 if steer_only else repeats):
                pin_slider(page, 100 + r)  # focused: the arrow key below moves it
                t1 = time.perf_counter()
                page.keyboard.press("ArrowLeft")  # gain 1.0 -> 0.9: new controls, nothing cached
                wait_for_run(page)
                times.append(time.perf_counter() - t1)
                fresh = re.compile(r"generated just now in [\d,]+ ms for \d+ tokens")  # the steered column's run
                caption = page.get_by_text(fresh).last.inner_text(timeout=30_000)
                took = re.search(r"in ([\d,]+) ms for (\d+) tokens", caption)
                results.setdefault("server_generation_ms", []).append(int(took[1].replace(",", "")))
                results.setdefault("steered_tokens", []).append(int(took[2]))
            if times:
                results["slider_to_64_tokens_s_median"] = round(statistics.median(times), 3)
                results["slider_to_64_tokens_s_min"] = round(min(times), 3)
                results["server_generation_ms"] = statistics.median(results["server_generation_ms"])
            with tempfile.TemporaryDirectory() as tmp:
                results |= steer_many_gains(page, Path(tmp), num_prototypes, repeats)
        finally:
            process.terminate()
            process.wait(timeout=30)
        if steer_only:
            browser.close()
            return results

        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "atlas16k.py"
            script.write_text(ATLAS_SCRIPT.format(repo=str(REPO)))
            process, url = start_streamlit(script, [])
            try:
                times = []
                for _ in range(max(2, repeats // 2)):
                    t1 = time.perf_counter()
                    page.goto(url)
                    page.locator(".js-plotly-plot .nsewdrag").first.wait_for()
                    page.wait_for_function(
                        "() => { const c = document.querySelector('.js-plotly-plot canvas'); return c && c.width > 0; }"
                    )
                    page.get_by_text("drawn").wait_for()
                    times.append(time.perf_counter() - t1)
                results["atlas_16384_render_s_first"] = round(times[0], 2)
                results["atlas_16384_render_s_median"] = round(statistics.median(times[1:]), 2)
            finally:
                process.terminate()
                process.wait(timeout=30)
        browser.close()
    return results


def figure_build() -> dict:
    import numpy as np

    from explorer.figures import atlas_figure

    rng = np.random.default_rng(0)
    P = 16_384
    groups = rng.choice(["a", "b", "c", "d", "e", "f"], P).tolist()
    t0 = time.perf_counter()
    fig = atlas_figure(
        rng.normal(size=(P, 2)), np.arange(P), groups, rng.random(P), hover=[f"prototype {j}" for j in range(P)]
    )
    payload = fig.to_json()
    return {
        "atlas_16384_build_ms": round(1000 * (time.perf_counter() - t0), 1),
        "atlas_16384_json_kb": round(len(payload) / 1024, 1),
    }


def steer_app_test(model: str, num_prototypes: int):
    """Steer with 1,000 gains under Streamlit's AppTest (server-side, no browser): page open and
    one table edit, each a script run with its regeneration. Returns the figures and the AppTest
    (the model loaded, on the Steer page) for more."""
    from streamlit.testing.v1 import AppTest

    from explorer.controls import ControlSet
    from tests.explorer.browser_model import Browser

    os.environ.setdefault("PRISM_EXPLORER_BUNDLES", str(Path(model).resolve().parent))
    at = AppTest.from_file(str(REPO / "explorer" / "app.py"), default_timeout=900)
    at.session_state["bundle_path"] = model
    browser = Browser(at)  # sends a table edit as Streamlit's browser does, so its on_change runs
    at.run()  # loads the model and index once (not timed)
    at.switch_page("views/steer.py")
    at.run()  # the original text, generated once and cached (not timed)
    gains = thousand_gains(num_prototypes)
    history = at.session_state["controls"]
    at.session_state["controls"] = history.commit(ControlSet.of(gains), f"bench: {len(gains):,} gains")
    out: dict = {"steer_1000_gains_count": len(gains)}
    t0 = time.perf_counter()
    at.run()
    out["steer_1000_gains_open_s"] = round(time.perf_counter() - t0, 3)
    assert not at.exception, [e.value for e in at.exception]
    serial = at.session_state["controls"].serial
    edit = {"edited_rows": {0: {"gain": 2.75}}, "added_rows": [], "deleted_rows": []}  # one gain edited
    t0 = time.perf_counter()
    browser.edit_table(at.data_editor(key=f"steer_table_{serial}"), edit)
    out["steer_1000_gains_edit_s"] = round(time.perf_counter() - t0, 3)
    assert not at.exception, [e.value for e in at.exception]
    out["steer_1000_gains_sliders"] = len([s for s in at.slider if (s.key or "").startswith("steer_gain_")])
    assert at.session_state["controls"].present.gain(min(gains)) == 2.75
    generated = [c.value for c in at.caption if c.value.startswith("Original:")]
    out["steer_generation_note"] = generated[0] if generated else ""
    return out, at


def audit(model: str) -> dict:
    """Issue 17's figures, in-process (the page scripts under Streamlit's AppTest, no browser):
    the map-structure score of the shipped layout against the other layouts and a shuffled
    baseline; Steer with 1,000 gains: page open and one table edit; 50 prototypes picked on the
    Atlas (a lasso) to the page with their table and card."""
    from core import build_atlas_tables, load_bundle, load_index
    from core.atlas.layout import compare_layouts, knn_purity, shuffled_purity

    bundle, index = load_bundle(model), load_index(model)
    tables = build_atlas_tables(bundle, index)
    groups = {"categories": tables.categories, "dominant sources": tables.dominant}
    candidates = compare_layouts(bundle, index, groups)  # every input x n_neighbors, several s each
    keys = next(c for c in candidates if c["input"] == "keys" and c["n_neighbors"] == 15)  # the old map
    out: dict = {
        "structure_shipped_layout": tables.layout,
        "structure_shipped": {name: round(knn_purity(tables.xy, g), 4) for name, g in groups.items()},
        "structure_keys_umap": {name: keys[name] for name in groups},
        "structure_shuffled": {name: round(shuffled_purity(g), 4) for name, g in groups.items()},
        "structure_candidates": candidates,
    }

    steer, at = steer_app_test(model, bundle.model.config.num_prototypes)
    out |= steer
    at.switch_page("views/atlas.py")
    at.run()
    at.session_state["atlas_picked"] = list(range(0, 50 * 7, 7))  # what a lasso around 50 points sets
    t0 = time.perf_counter()
    at.run()
    out["lasso_50_cards_s"] = round(time.perf_counter() - t0, 3)
    out["lasso_50_rows"] = len(at.dataframe[0].value) if at.dataframe else 0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "assets" / "models" / "demo"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--audit-only",
        action="store_true",
        help="only issue 17's in-process figures (map structure, 1,000 gains, 50 cards); use with --results-tag audit",
    )
    parser.add_argument(
        "--steer-only",
        action="store_true",
        help="only Steer with 1,000 gains (server-side under AppTest, then in the browser); writes no results "
        "file unless --results-tag is given",
    )
    _results.add_arguments(parser)
    args = parser.parse_args()
    figures = {"cpu_cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    if args.audit_only:
        figures |= audit(args.model)
        figures["load_average_1min_after"] = round(os.getloadavg()[0], 2)
        for key, value in figures.items():
            print(f"{key:<34} {value}")
        _results.emit(figures, args, __file__)
        return
    if args.steer_only:
        from core import load_bundle

        args.no_results = args.no_results or args.results_tag is None  # never a partial explorer.json
        num_prototypes = load_bundle(args.model).model.config.num_prototypes
        figures |= steer_app_test(args.model, num_prototypes)[0]
        if has_browser():
            figures |= in_browser(args.model, args.repeats, num_prototypes, steer_only=True)
        figures["load_average_1min_after"] = round(os.getloadavg()[0], 2)
        for key, value in figures.items():
            print(f"{key:<52} {value}")
        _results.emit(figures, args, __file__)
        return
    figures |= in_process(args.model, args.repeats)
    figures |= figure_build()
    figures |= audit(args.model)
    if has_browser():
        figures |= in_browser(args.model, args.repeats, figures["num_prototypes"])
    figures["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    rows = [
        ("cold start to first Atlas render (browser)", figures.get("cold_start_s"), "s"),
        ("slider change -> regenerated text on screen, median", figures.get("slider_to_64_tokens_s_median"), "s"),
        ("  of which server-side generation, median", figures.get("server_generation_ms"), "ms"),
        ("  tokens of each steered text (up to 64)", figures.get("steered_tokens"), ""),
        ("generate_text 64 tokens in-process, median", figures["generate_64_ms_median"], "ms"),
        ("atlas 16,384 prototypes: first render (browser)", figures.get("atlas_16384_render_s_first"), "s"),
        ("atlas 16,384 prototypes: later renders, median", figures.get("atlas_16384_render_s_median"), "s"),
        ("atlas 16,384 prototypes: figure build + JSON (server)", figures["atlas_16384_build_ms"], "ms"),
        ("atlas 16,384 prototypes: figure JSON size", figures["atlas_16384_json_kb"], "KB"),
        ("lasso of 50 -> cards and table on screen, median (browser)", figures.get("lasso_50_browser_s_median"), "s"),
        ("  prototypes the lassos selected", figures.get("lasso_50_browser_counts"), ""),
        ("Steer, 1,000 gains: file loaded -> table and text", figures.get("steer_1000_gains_browser_load_s"), "s"),
        ("Steer, 1,000 gains: page open (browser)", figures.get("steer_1000_gains_browser_open_s"), "s"),
        (
            "Steer, 1,000 gains: one table edit, median (browser)",
            figures.get("steer_1000_gains_browser_edit_s_median"),
            "s",
        ),
        (
            "Steer, 1,000 gains: slider move, median (browser)",
            figures.get("steer_1000_gains_browser_slider_s_median"),
            "s",
        ),
        ("Steer, 1,000 gains: page open (server-side)", figures["steer_1000_gains_open_s"], "s"),
        ("Steer, 1,000 gains: one table edit (server-side)", figures["steer_1000_gains_edit_s"], "s"),
        (
            "load average (1 min) before / after",
            f"{figures['load_average_1min']} / {figures['load_average_1min_after']}",
            "",
        ),
    ]
    rows += [
        (
            f"map structure ({name}): shipped / keys-UMAP / shuffled",
            " / ".join(str(figures[f"structure_{which}"][name]) for which in ("shipped", "keys_umap", "shuffled")),
            "",
        )
        for name in figures["structure_shipped"]
    ]
    print(f"{'measure':<58} {'value':>12}")
    for name, value, unit in rows:
        shown = "n/a (no browser)" if value is None else f"{value} {unit}".strip()
        print(f"{name:<58} {shown:>12}")
    _results.emit(figures, args, __file__)


if __name__ == "__main__":
    main()
