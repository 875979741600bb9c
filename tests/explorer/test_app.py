"""The explorer under Streamlit's AppTest, on a tiny PRISM bundle trained and indexed in the run:
every page renders without exceptions, the slices shown sum to the logit shown, a gain change
changes the regenerated text, two sessions keep their own controls, corpus HTML is shown as
text; plus the figure builders, the report and concurrent seeded generation."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("streamlit")
pytest.importorskip("plotly")
from streamlit.testing.v1 import AppTest  # noqa: E402

from core import (  # noqa: E402
    GenerationSettings,
    decompose,
    generate_text,
    load_bundle,
    load_index,
)
from explorer.clickselect import CLICK_SELECT_JS  # noqa: E402
from explorer.comparison import ENDED, differing_positions, token_rows, token_spans  # noqa: E402
from explorer.controls import ControlSet  # noqa: E402
from explorer.figures import atlas_figure, selected_ids, waterfall_figure  # noqa: E402
from tests.helpers import APP, EVIL, EVIL_ESCAPED


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("PRISM_EXPLORER_THREADS", "0")  # leave torch's thread setting to the test run
    monkeypatch.setenv("PRISM_EXPLORER_BUNDLES", str(tmp_path_factory.getbasetemp()))  # the test bundles


def app(bundle: Path) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["bundle_path"] = str(bundle)
    return at


def applied(at: AppTest) -> ControlSet:
    """The controls the session applies (the one value every page renders from)."""
    return at.session_state["controls"].present


def set_controls(at: AppTest, value: ControlSet) -> None:
    """Give the session these controls, as an action of the analyst would (undo can take them back)."""
    at.session_state["controls"] = at.session_state["controls"].commit(value, "set by the test")


def open_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py")
    return at.run()


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def htmls(at: AppTest) -> list[str]:
    """The st.html bodies, less the app's own click-to-select script (explorer/clickselect.py)."""
    return [h.proto.body for h in at.get("html") if h.proto.body != CLICK_SELECT_JS]


def chart_spec(at: AppTest, index: int = 0) -> dict:
    return json.loads(at.get("plotly_chart")[index].proto.spec)


def decode(value) -> np.ndarray:
    """A plotly JSON array: a list, or numpy's base64 form {"dtype", "bdata"}."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return np.asarray(value)


def test_every_page_renders(explorer_bundle):
    at = app(explorer_bundle).run()
    no_errors(at)
    spec = chart_spec(at)
    gl = [t for t in spec["data"] if t["type"] == "scattergl"]
    assert len(gl) == 1 and len(decode(gl[0]["customdata"])) == 64  # every tiny prototype, one WebGL trace
    at.session_state["atlas_picked"] = [1, 2]
    at.run()
    no_errors(at)
    assert any("Prototype 1" in m.value for m in at.markdown)
    for page in ("trace", "steer", "compare", "calibrate", "report", "outliers"):
        open_page(at, page)
        no_errors(at)
    assert any("no self-influence" in i.value and "prism index" in i.value for i in at.info)  # no influence built
    open_page(at, "trace")
    at.button(key="trace_run").click().run()
    no_errors(at)
    open_page(at, "report")
    no_errors(at)
    assert [d.proto.label for d in at.get("download_button")][:3] == [
        "Download HTML (offline)",
        "Download JSON",
        "Download CSV",
    ]


def test_trace_slices_sum_to_the_logit_shown(explorer_bundle):
    at = open_page(app(explorer_bundle).run(), "trace")
    at.text_area(key="trace_prompt").set_value("HAMLET. To be")
    at.button(key="trace_run").click().run()
    no_errors(at)
    for position in (0, 3):
        at.pills(key="trace_token").set_value(position).run()
        no_errors(at)
        metrics = {m.label: m.value for m in at.metric}
        assert float(metrics["Σ slices"]) == pytest.approx(float(metrics["Logit"]), abs=1e-4)
        waterfall = next(t for t in chart_spec(at)["data"] if t["type"] == "waterfall")
        steps = decode(waterfall["x"]).astype(np.float64)
        assert waterfall["measure"][-1] == "total"
        assert steps[:-1].sum() == pytest.approx(steps[-1], abs=1e-4)
        assert steps[-1] == pytest.approx(float(metrics["Logit"]), abs=1e-4)
        assert f"token {position + 1} / " in " ".join(m.value for m in at.markdown)


def steered_text(at: AppTest) -> str:
    bodies = htmls(at)
    return bodies[1]  # original first, then steered


def test_gain_change_changes_regenerated_text(explorer_bundle):
    bundle = load_bundle(explorer_bundle)
    prompt = "KING. What"
    first = decompose(bundle, prompt=prompt, max_new_tokens=1).tokens[0]
    active = [p.id for p in first.prototypes]
    at = open_page(app(explorer_bundle).run(), "steer")
    at.text_area(key="steer_prompt").set_value(prompt)
    at.slider(key="steer_max_new").set_value(16)
    at.toggle(key="steer_greedy").set_value(True)  # the first token's prototypes decide the greedy text
    at.run()
    set_controls(at, ControlSet.of({j: 0.0 for j in active[1:]} | {active[0]: 1.0}))
    at.session_state["steer_pinned"] = [active[0]]  # its gain slider on the page (Add a gain slider)
    at.run()
    no_errors(at)
    before = steered_text(at)
    at.slider(key=f"steer_gain_{active[0]}").set_value(0.0).run()
    no_errors(at)
    after = steered_text(at)
    assert after != before
    assert applied(at).gains[active[0]] == 0.0


def test_two_sessions_keep_their_own_controls(explorer_bundle):
    prompt = "HAMLET. To be, or not"
    sessions = []
    for _ in range(2):
        at = open_page(app(explorer_bundle).run(), "steer")
        at.text_area(key="steer_prompt").set_value(prompt).run()
        sessions.append(at)
    one, two = sessions
    baseline = steered_text(two)
    bundle = load_bundle(explorer_bundle)
    first = decompose(bundle, prompt=prompt, max_new_tokens=1).tokens[0]
    set_controls(one, ControlSet.of({p.id: 0.0 for p in first.prototypes}))
    one.run()
    no_errors(one)
    assert steered_text(one) != baseline
    two.run()
    no_errors(two)
    assert applied(two).gains == {}
    assert steered_text(two) == baseline
    assert "none (the model as trained)" in [c.value for c in two.caption]
    # the model the app cached for both sessions was not touched by session one's controls
    from explorer.state import cached_bundle

    cached = cached_bundle(str(explorer_bundle)).model.state_dict()
    fresh = load_bundle(explorer_bundle).model.state_dict()
    assert cached.keys() == fresh.keys() and all(torch.equal(cached[k], fresh[k]) for k in cached)


def test_corpus_html_is_shown_as_text(explorer_bundle):
    index = load_index(explorer_bundle)
    evil = [
        j
        for j in range(index.num_prototypes)
        if any(n["doc_id"].startswith("evil-") for n in index.neighbourhood(j)[:5])
    ]
    assert evil, "no prototype has a planted document among its nearest neighbours"
    at = app(explorer_bundle).run()
    at.session_state["atlas_picked"] = [evil[0]]
    at.run()
    no_errors(at)
    bodies = "".join(htmls(at))
    assert all(needle in bodies for needle in EVIL_ESCAPED), bodies[:2000]
    assert "<script>" not in bodies and "<img" not in bodies
    # the map's hover text is escaped too
    hover = [t for t in chart_spec(at)["data"] if t["type"] == "scattergl"][0]["hovertext"]
    assert not any("<script>" in h for h in hover)

    at = open_page(at, "trace")
    at.text_area(key="trace_prompt").set_value(f"Note 3: {EVIL}")
    at.radio(key="trace_mode").set_value("score my own").run()
    at.text_area(key="trace_completion").set_value(" end of note 3.")
    at.button(key="trace_run").click().run()
    no_errors(at)
    assert f"Note 3: {EVIL}" in [t.value for t in at.text]  # the prompt as plain text
    bodies = "".join(htmls(at))
    assert "<script>" not in bodies and "<img" not in bodies


def test_bad_bundle_path_is_an_error_not_a_traceback(tmp_path):
    at = app(tmp_path / "nowhere").run()
    assert not at.exception
    assert any("Cannot open bundle" in e.value for e in at.error)


def test_atlas_figure_is_one_webgl_trace_with_ids():
    rng = np.random.default_rng(0)
    P = 16_384
    ids = np.arange(P, dtype=np.int32)
    groups = rng.choice(["shakespeare", "wordnet", "debian"], P).tolist()
    fig = atlas_figure(rng.normal(size=(P, 2)), ids, groups, rng.random(P), highlight=[5, 9])
    gl = [t for t in fig.data if t.type == "scattergl"]
    assert len(gl) == 1
    assert np.array_equal(np.asarray(gl[0].customdata), ids)
    assert len(fig.to_json()) < 1_000_000
    event = {
        "selection": {
            "points": [
                {"curve_number": 0, "point_index": 3, "customdata": 3},
                {"curve_number": 1, "point_index": 0, "customdata": [9]},
            ]
        }
    }
    assert selected_ids(event) == [3, 9]
    assert selected_ids({"selection": {"points": []}}) == [] and selected_ids(None) == []


def test_waterfall_total_is_the_logit():
    slices = [0.5, -0.25, 2.0, 0.125, 0.0625]
    fig = waterfall_figure([10, 11, 12, 13, 14], slices, sum(slices), shown=3)
    x = np.asarray(fig.data[0].x, dtype=np.float64)
    assert x[-1] == pytest.approx(sum(slices)) and x[:-1].sum() == pytest.approx(x[-1])
    assert list(fig.data[0].customdata)[:3] == [12, 10, 11]
    labelled = waterfall_figure([10, 11], [1.0, 0.5], 1.5, labels=["a label longer than the bar has room for", "short"])
    assert list(labelled.data[0].y)[:2] == ["#10 a label longer than the bar…", "#11 short"]


def test_sampled_generation_is_seeded_per_call_and_thread_safe(loaded):
    prompt, n = "HAMLET.", 12
    sampled = GenerationSettings(do_sample=True)
    expected = {seed: generate_text(loaded, prompt, n, seed=seed, settings=sampled).text for seed in range(4)}
    torch.manual_seed(123)
    state_before = torch.random.get_rng_state()
    results: dict[int, list[str]] = {seed: [] for seed in range(4)}

    def worker(seed: int) -> None:
        for _ in range(3):
            results[seed].append(generate_text(loaded, prompt, n, seed=seed, settings=sampled).text)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(texts == [expected[seed]] * 3 for seed, texts in results.items())
    assert torch.equal(torch.random.get_rng_state(), state_before)  # the caller's generator is untouched
    assert len(set(expected.values())) > 1  # different seeds really sample differently


def test_steer_targets_by_query_and_suppresses_them(explorer_bundle):
    at = open_page(app(explorer_bundle).run(), "steer")
    at.text_input(key="steer_query").set_value("the")
    at.button(key="steer_by_query").click().run()
    no_errors(at)
    targets = at.session_state["steer_targets"]
    assert targets
    at.button(key="steer_suppress_targets").click().run()
    no_errors(at)
    assert sorted(applied(at).suppressed) == sorted(targets)


def test_compare_table_shows_no_none_where_one_text_ended(explorer_bundle):
    """Prompt B's text shorter than A's: its cells say the text ended, never "None" (issue 17)."""
    bundle = load_bundle(explorer_bundle)
    long = decompose(bundle, prompt="KING.", completion=" Good morrow, my lord")
    short = decompose(bundle, prompt="QUEEN.", completion=" Good")
    assert len(short.tokens) < len(long.tokens)
    rows = token_rows(("A", "B"), long, short)
    assert len(rows) == len(long.tokens)
    ended = rows[len(short.tokens) :]
    assert all(r["B: token"] == ENDED and r["B: probability"] == "" for r in ended)
    assert all(r["A: probability"] == f"{t.probability:.3f}" for r, t in zip(rows, long.tokens, strict=True))
    shown = pd.DataFrame(rows).astype(str).to_numpy().ravel().tolist()
    assert not any(cell in ("None", "nan", "<NA>") for cell in shown)
    assert differing_positions(long, short)[-1] == len(long.tokens) - 1  # the ended positions differ
    assert differing_positions(long, long) == []
    assert token_spans(short, long).count('<span class="prism-tok') == len(short.tokens)


def test_outliers_lists_documents_by_self_influence(explorer_bundle, tmp_path_factory):
    """With influence built, the Outliers page lists the training documents by self-influence
    per token, highest first (as `prism outliers` does), filters them by source, draws every
    document in the histogram, and shows corpus text as text."""
    import shutil

    from core.attribution.influence import InfluenceArguments, build_influence, outliers

    bundle = tmp_path_factory.getbasetemp() / "explorer-influence" / "bundle"
    shutil.copytree(explorer_bundle, bundle)
    corpus = explorer_bundle.parent / "corpus"
    build_influence(bundle, corpus, InfluenceArguments(rank=8, curvature_tokens=4096), show_progress=False)
    expected = outliers(bundle, top=None)
    at = open_page(app(bundle).run(), "outliers")
    no_errors(at)
    table = at.dataframe[0].value
    listed = min(25, len(expected["records"]))
    assert list(table["document"]) == [r["doc_id"] for r in expected["records"][:listed]]
    assert list(table["self-influence / token"]) == sorted(table["self-influence / token"], reverse=True)
    histogram = chart_spec(at)["data"]
    assert sum(len(decode(t["x"])) for t in histogram) == int((expected["all_scores"] > 0).sum())
    at.multiselect(key="out_sources").set_value(["web"]).run()  # the planted HTML documents' source
    no_errors(at)
    table = at.dataframe[0].value
    assert set(table["source"]) == {"web"} and any(EVIL in text for text in table["text"])  # shown as data
    assert "<script>" not in "".join(htmls(at))
    assert [t["name"] for t in chart_spec(at)["data"]] == ["web"]
