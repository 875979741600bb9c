"""Permalinks and reports (issue 17, item 5): the address a page writes reopens the same view in a
new session (same bundle by name, prompt, token, slices, card and controls); large control sets
go through a server-side copy; the report names its file from the prompt and time, holds no
server path, labels its bars, counts "others" as the app does and has a contents list."""

from __future__ import annotations

import inspect
import re
import time

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from core import WATERFALL_SLICES, attribute, load_bundle, load_index, report_from_attributions  # noqa: E402
from core.report import to_html, waterfall_svg  # noqa: E402
from explorer import permalink, state  # noqa: E402
from explorer.controls import ControlSet  # noqa: E402
from explorer.figures import waterfall_figure  # noqa: E402
from tests.helpers import APP  # noqa: E402


@pytest.fixture(autouse=True)
def _environment(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("PRISM_EXPLORER_THREADS", "0")
    monkeypatch.setenv(state.BUNDLES_ENV, str(tmp_path_factory.getbasetemp()))


def test_controls_round_trip_inline_and_kept():
    small = ControlSet.of({3: 0.1, 7: 2.5}, [9, 11])
    params = permalink.encode_controls(small)
    assert set(params) == {"g", "s"} and permalink.decode_controls(params) == small
    large = ControlSet.of({j: 1.0 + j / 7 for j in range(300)}, [400, 401])
    params = permalink.encode_controls(large)
    assert set(params) == {"ctl"} and len(params["ctl"]) == 20
    assert permalink.decode_controls(params) == large
    assert permalink.decode_controls({}) is None
    with pytest.raises(ValueError, match="restarted"):
        permalink.decode_controls({"ctl": "0" * 20})
    with pytest.raises(ValueError, match="g=ID:GAIN"):
        permalink.decode_controls({"g": "1:x"})


def test_a_permalink_reopens_the_same_trace(explorer_bundle):
    bundle = load_bundle(explorer_bundle)
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["bundle_path"] = str(explorer_bundle)
    at.run()
    at.switch_page("views/trace.py")
    at.run()
    at.text_area(key="trace_prompt").set_value("HAMLET. To be")
    at.slider(key="trace_max_new").set_value(4)
    at.button(key="trace_run").click().run()
    first = at.session_state[state.TRACE].decomposition.tokens[0]
    controls = ControlSet.of({first.prototypes[1].id: 0.5}, [first.prototypes[0].id])
    at.session_state[state.CONTROLS] = at.session_state[state.CONTROLS].commit(controls, "test")
    at.button(key="trace_run").click().run()
    at.pills(key="trace_token").set_value(2).run()
    at.session_state[state.CARD] = first.prototypes[2].id
    at.run()
    assert not at.exception and not at.error
    params = {k: at.query_params[k] for k in at.query_params}
    assert params["prompt"] == "HAMLET. To be" and params["token"] == "2" and params["n"] == "4"
    assert params["bundle"] == state.shown_bundle_path(str(explorer_bundle))
    assert str(explorer_bundle) not in params["bundle"] or not params["bundle"].startswith("/")
    shown = at.session_state[state.TRACE].decomposition.tokens[2]

    fresh = AppTest.from_file(APP, default_timeout=120)  # a new browser: nothing but the address
    for key, value in params.items():
        fresh.query_params[key] = value
    fresh.switch_page("views/trace.py")
    fresh.run()
    assert not fresh.exception and not fresh.error, [e.value for e in fresh.error]
    assert fresh.session_state[state.CONTROLS].present == controls
    assert fresh.session_state[state.CONTROLS].undo_action == "opened a permalink"
    again = fresh.session_state[state.TRACE].decomposition
    assert fresh.session_state["trace_token"] == 2 and again.tokens[2].token == shown.token
    assert [(p.id, p.slice) for p in again.tokens[2].prototypes] == [(p.id, p.slice) for p in shown.prototypes]
    assert fresh.session_state[state.CARD] == first.prototypes[2].id
    assert any(m.value == "#### Prototype " + str(first.prototypes[2].id) for m in fresh.markdown)
    assert "token 3 / " in " ".join(m.value for m in fresh.markdown)
    assert bundle.fingerprint in " ".join(c.value for c in fresh.sidebar.caption)


def test_report_file_name_paths_labels_others_and_contents(explorer_bundle):
    from explorer.export import file_stem

    stem = file_stem("ROMEO. But soft, what light", time.gmtime(0))
    assert stem == "prism-report-romeo-but-soft-what-light-19700101-000000"
    bundle, index = load_bundle(explorer_bundle), load_index(explorer_bundle)
    result = attribute(bundle, index, "KING. What", None, top=2, max_new_tokens=3)
    report = report_from_attributions([result])
    token = report["traces"][0]["tokens"][0]
    labels = {p["id"]: "label-" + str(p["id"]) for p in token["prototypes"]}
    for p in token["prototypes"]:
        p["label"] = labels[p["id"]]
    page = to_html(report)
    strongest = max(token["prototypes"], key=lambda p: abs(p["slice"]))
    assert f"#{strongest['id']} label-{strongest['id']}" in page  # labelled bars
    k = len(token["prototypes"])
    shown = k - 3  # the tiny model has k=8 < WATERFALL_SLICES: compare the two counts at a smaller cut
    fig = waterfall_figure(
        [p["id"] for p in token["prototypes"]], [p["slice"] for p in token["prototypes"]], token["logit"], shown=shown
    )
    app_others = [y for y in fig.data[0].y if re.match(r"\d+ others?$", y)]
    assert app_others == ["3 others"] and ">3 others<" in waterfall_svg(token, shown=shown)
    defaults = {inspect.signature(f).parameters["shown"].default for f in (waterfall_figure, waterfall_svg)}
    assert defaults == {WATERFALL_SLICES}  # the app and the report cut at the same slice
    assert "Slices by category" in page and ">label-" in page
    assert "<nav><h2>Contents</h2>" in page and 'href="#t1-1"' in page and 'id="t1-3"' in page
    assert np.isclose(sum(p["slice"] for p in token["prototypes"]), token["logit"], atol=1e-4)
