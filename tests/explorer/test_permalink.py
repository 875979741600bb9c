"""Permalinks and reports (issue 17, item 5): the address a page writes reopens the same view in a
new session (same bundle by name, prompt, token, slices, card and controls; on Steer the same
generation settings, a malformed one left out with a notice); large control sets go through a
server-side copy; the report names its file from the prompt and time, holds no server path,
labels its bars, counts "others" as the app does and has a contents list."""

from __future__ import annotations

import inspect
import re
import time

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from core import (  # noqa: E402
    DEFAULT_GENERATION,
    GREEDY,
    WATERFALL_SLICES,
    GenerationSettings,
    attribute,
    load_bundle,
    load_index,
    report_from_attributions,
)
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


STEER_GENERATION_KEYS = (
    "steer_greedy",
    "steer_sample",
    "steer_temperature",
    "steer_top_p",
    "steer_repetition_penalty",
    "steer_no_repeat_ngram",
)


def steer_page(at: AppTest) -> AppTest:
    at.switch_page("views/steer.py")
    return at.run()


def both_texts(at: AppTest) -> str:
    """The Steer page's caption saying how both texts were generated."""
    return next(c.value for c in at.caption if c.value.startswith("Both texts "))


@pytest.mark.parametrize(
    "settings",
    [
        GREEDY,
        GenerationSettings(do_sample=True, temperature=1.3, top_p=0.8, repetition_penalty=1.25, no_repeat_ngram_size=3),
        GenerationSettings(repetition_penalty=1.5),  # greedy decoding with a penalty: not plain greedy
        GenerationSettings(do_sample=True, temperature=0.7, top_p=0.5),
        DEFAULT_GENERATION,
    ],
)
def test_generation_settings_round_trip(settings):
    params = permalink.encode_generation(settings)
    assert set(params) <= set(permalink.GENERATION_PARAMS)
    assert (params == {}) == (settings == DEFAULT_GENERATION)
    assert (permalink.decode_generation(params) or DEFAULT_GENERATION) == settings


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"greedy": "yes"}, "greedy='yes'"),
        ({"sample": "2"}, "sample='2' is not 0 or 1"),
        ({"temp": "9"}, r"temp='9' is not a number from 0.1 to 2"),
        ({"topp": "nan"}, "topp='nan' is not a number"),
        ({"rep": "x"}, "rep='x' is not a number from 1 to 2"),
        ({"ngram": "1.5"}, "ngram='1.5' is not a whole number from 0 to 10"),
        ({"sample": "0", "temp": "0.5"}, "apply only when sampling"),
    ],
)
def test_malformed_generation_settings_are_refused(params, match):
    with pytest.raises(ValueError, match=match):
        permalink.decode_generation(params)


@pytest.mark.parametrize("case", ["sampled", "greedy with a penalty"])
def test_a_steer_permalink_keeps_the_generation_settings(explorer_bundle, case):
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["bundle_path"] = str(explorer_bundle)
    steer_page(at.run())
    at.slider(key="steer_max_new").set_value(16)
    at.number_input(key="steer_seed").set_value(7)
    if case == "sampled":
        at.slider(key="steer_temperature").set_value(1.3)
        at.slider(key="steer_top_p").set_value(0.8)
        at.number_input(key="steer_no_repeat_ngram").set_value(4)  # the default's is 3
        expected = {"temp": "1.3", "topp": "0.8", "rep": "1.25", "ngram": "4"}
        words = "sampled with seed 7, temperature 1.3, top-p 0.8, repetition penalty 1.25, no repeated 4-grams"
    else:
        at.toggle(key="steer_sample").set_value(False)
        expected = {"sample": "0", "rep": "1.25"}  # the default's no-repeat n-gram size is kept
        ngram = DEFAULT_GENERATION.no_repeat_ngram_size
        words = "generated greedily, repetition penalty 1.25" + (f", no repeated {ngram}-grams" if ngram else "")
    at.slider(key="steer_repetition_penalty").set_value(1.25)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    params = {k: at.query_params[k] for k in at.query_params}
    assert {k: v for k, v in params.items() if k in permalink.GENERATION_PARAMS} == expected
    assert both_texts(at) == f"Both texts {words}."

    fresh = AppTest.from_file(APP, default_timeout=120)  # a new browser: nothing but the address
    for key, value in params.items():
        fresh.query_params[key] = value
    steer_page(fresh)
    assert not fresh.exception and not fresh.error and not fresh.warning, [w.value for w in fresh.warning]
    assert {k: fresh.session_state[k] for k in STEER_GENERATION_KEYS} == {
        k: at.session_state[k] for k in STEER_GENERATION_KEYS
    }
    assert both_texts(fresh) == both_texts(at)
    assert [h.value for h in fresh.html] == [h.value for h in at.html]  # the same two texts


def test_a_malformed_steer_permalink_is_left_out_with_a_notice(explorer_bundle):
    fresh = AppTest.from_file(APP, default_timeout=120)
    params = {"bundle": state.shown_bundle_path(str(explorer_bundle)), "sprompt": "KING.", "sn": "8"}
    for key, value in (params | {"temp": "9", "rep": "1.5"}).items():  # a temperature out of the slider's range
        fresh.query_params[key] = value
    steer_page(fresh)
    assert not fresh.exception and not fresh.error, [e.value for e in fresh.error]
    notices = [w.value.replace("\\", "").replace("\u2060", "") for w in fresh.warning]  # md() escapes, undone
    assert any("generation settings were not applied" in w and "temp='9'" in w for w in notices), notices
    assert both_texts(fresh) == f"Both texts {DEFAULT_GENERATION.describe(0)}."  # none of the link's settings
    assert fresh.session_state["steer_repetition_penalty"] == DEFAULT_GENERATION.repetition_penalty
