"""Hostile input on every page (issue 15, items 6 and 7): a bundle indexed and labelled on the
hostile corpus (tests/explorer/hostile.py), hostile prompts, queries and uploads. Every string
Streamlit renders as markdown, every st.html body and every Plotly text field must hold the
hostile strings only in escaped form; uploads nested 200,000 deep or holding 5,000-digit numbers
are one-line errors; the atlas CSV guards formula cells."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from core import build_atlas_tables, load_bundle, load_index  # noqa: E402
from explorer import state  # noqa: E402
from explorer.clickselect import CLICK_SELECT_JS  # noqa: E402
from explorer.safe import csv_frame, html_text, md  # noqa: E402
from tests.explorer import hostile  # noqa: E402
from tests.helpers import APP  # noqa: E402

MARKDOWN_FIELDS = ("body", "label", "help", "delta", "placeholder")  # rendered as markdown by Streamlit
MARKDOWN_TYPES = {
    "markdown",
    "caption",
    "metric",
    "error",
    "info",
    "warning",
    "success",
    "button",
    "download_button",
    "slider",
    "toggle",
    "number_input",
    "text_input",
    "text_area",
    "radio",
    "selectbox",
    "multiselect",
    "file_uploader",
    "segmented_control",
    "pills",
    "button_group",
    "select_slider",
    "checkbox",
    "progress",
}


@pytest.fixture(autouse=True)
def _environment(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("PRISM_EXPLORER_THREADS", "0")
    monkeypatch.setenv(state.BUNDLES_ENV, str(tmp_path_factory.getbasetemp()))


def _walk(node):
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _walk(child)


def rendered(at: AppTest) -> dict[str, list[str]]:
    """The strings the app sent, by how the browser renders them: markdown, html, plotly."""
    out: dict[str, list[str]] = {"markdown": [], "html": [], "plotly": []}
    for root in (at.main, at.sidebar):
        for node in _walk(root):
            proto = getattr(node, "proto", None)
            kind = getattr(node, "type", "")
            if proto is None:
                continue
            if kind == "html":
                if proto.body != CLICK_SELECT_JS:  # the app's own script, no corpus text in it
                    out["html"].append(proto.body)
            elif kind == "plotly_chart":
                out["plotly"] += _plotly_strings(json.loads(proto.spec))
            elif kind == "expandable" or hasattr(proto, "expandable"):
                label = getattr(getattr(proto, "expandable", None), "label", "")
                if label:
                    out["markdown"].append(label)
            if kind in MARKDOWN_TYPES or kind.startswith("button"):
                for name in MARKDOWN_FIELDS:
                    value = getattr(proto, name, None)
                    if isinstance(value, str) and value:
                        out["markdown"].append(value)
                if kind in ("pills", "segmented_control", "button_group"):
                    out["markdown"] += [str(getattr(o, "content", "")) for o in getattr(proto, "options", [])]
    return out


def _plotly_strings(spec) -> list[str]:
    found = []
    if isinstance(spec, dict):
        for key, value in spec.items():
            if key in ("name", "text", "hovertext", "hovertemplate", "y", "title") and isinstance(value, str):
                found.append(value)
            elif key in ("text", "hovertext", "y") and isinstance(value, list):
                found += [v for v in value if isinstance(v, str)]
            else:
                found += _plotly_strings(value)
    elif isinstance(spec, list):
        for value in spec:
            found += _plotly_strings(value)
    return found


def assert_shown_as_text(at: AppTest, where: str) -> dict[str, list[str]]:
    assert not at.exception, (where, [e.value for e in at.exception])
    strings = rendered(at)
    for text in strings["markdown"]:
        assert not hostile.unescaped(text), (where, "markdown", text[:300])
    for kind in ("html", "plotly"):
        for text in strings[kind]:
            assert not hostile.unescaped(text, hostile.HTML_MARKERS), (where, kind, text[:300])
    return strings


def test_md_escapes_every_markdown_construct():
    for text in hostile.HOSTILE + hostile.SOURCES:
        assert not hostile.unescaped(md(text))
    assert md("a\nb") == "a b" and md("[x](y)") == "\\[x\\]\\(y\\)" and md("x" * 10, limit=4) == "xxx\u2026"


def test_html_text_uses_entities_plotly_decodes():
    # Plotly decodes numeric entities and &amp; &lt; &gt;, but draws &quot; as it is
    assert html_text("say \"hi\" & 'bye' <b>") == "say &#34;hi&#34; &amp; &#x27;bye&#x27; &lt;b&gt;"


def test_csv_export_guards_formula_cells():
    frame = pd.DataFrame({"label": list(hostile.FORMULAS) + ["plain"], "id": range(5)})
    read = pd.read_csv(io.StringIO(csv_frame(frame)))
    assert [x[0] for x in read["label"][:4]] == ["'"] * 4 and read["label"][4] == "plain"
    assert list(read["id"]) == list(range(5))


def test_hostile_input_is_text_on_every_page(hostile_bundle):
    bundle, index = load_bundle(hostile_bundle), load_index(hostile_bundle)
    tables = build_atlas_tables(bundle, index)
    marked = [j for j in range(tables.num_prototypes) if tables.dominant[j] in hostile.SOURCES]
    assert marked, "no prototype is dominated by a hostile source"
    assert any(c in hostile.SOURCES for c in tables.categories), "the labels did not take the hostile sources"

    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["bundle_path"] = str(hostile_bundle)
    at.run()
    assert_shown_as_text(at, "atlas")
    for colour in ("source", "category"):
        at.segmented_control(key="atlas_colour").set_value(colour).run()
        strings = assert_shown_as_text(at, f"atlas by {colour}")
        assert any("evil" in s for s in strings["plotly"]), "the hostile legend names are not drawn"
    at.text_input(key="atlas_query").set_value(hostile.COLOUR).run()
    assert_shown_as_text(at, "atlas search")
    at.session_state[state.PICKED] = marked[:3]
    at.run()
    strings = assert_shown_as_text(at, "atlas cards")
    shown = " ".join(m.value for m in at.markdown if "**dominant source**" in m.value)
    assert md(tables.dominant[marked[0]], limit=60) in shown  # shown, escaped

    at.switch_page("views/trace.py")
    at.run()
    at.text_area(key="trace_prompt").set_value(" ".join(hostile.HOSTILE))
    at.radio(key="trace_mode").set_value("score my own").run()
    at.text_area(key="trace_completion").set_value(f" {hostile.LINK} {hostile.COLOUR}")
    at.button(key="trace_run").click().run()
    assert not at.error, [e.value for e in at.error]
    assert_shown_as_text(at, "trace")
    for position in range(0, len(at.session_state[state.TRACE].decomposition.tokens), 3):
        at.pills(key="trace_token").set_value(position).run()
        assert_shown_as_text(at, f"trace token {position}")
    at.session_state[state.CARD] = marked[0]
    at.run()
    assert_shown_as_text(at, "trace card")
    at.text_area(key="trace_prompt").set_value("")
    at.button(key="trace_run").click().run()
    assert_shown_as_text(at, "trace error")

    at.switch_page("views/steer.py")
    at.run()
    at.text_area(key="steer_prompt").set_value(hostile.KATEX + hostile.LINK)
    at.slider(key="steer_max_new").set_value(8)
    at.session_state[state.PINNED] = marked[:2]
    at.run()
    assert_shown_as_text(at, "steer")
    for name, payload in (
        (f"{hostile.LINK}.json", hostile.deep_json()),
        (f"{hostile.COLOUR}.json", b'{"gains": {"1": 1e999}}'),
    ):
        at.file_uploader(key="steer_upload").set_value((name, payload, "application/json"))
        at.run()
        assert at.error, name
        assert_shown_as_text(at, f"steer upload {name[:10]}")
    assert at.session_state[state.CONTROLS].present.is_empty  # nothing was loaded

    at.switch_page("views/calibrate.py")
    at.run()
    at.radio(key="cal_source").set_value("upload").run()
    for name, payload in (
        (f"{hostile.HTML_LINK}.jsonl", hostile.deep_json()),
        ("huge.jsonl", hostile.huge_number_task()),
    ):
        at.file_uploader(key="cal_upload").set_value((name, payload, "application/json"))
        at.run()
        assert len(at.error) == 1 and "Cannot read the task" in at.error[0].value, [e.value for e in at.error]
        assert_shown_as_text(at, f"calibrate upload {name[:10]}")

    at.switch_page("views/compare.py")
    at.run()
    at.radio(key="cmp_mode").set_value(at.radio(key="cmp_mode").options[1]).run()
    at.text_area(key="cmp_prompt_a").set_value(hostile.LINK + hostile.KATEX)
    at.text_area(key="cmp_prompt_b").set_value(hostile.COLOUR + hostile.HTML_LINK).run()
    assert_shown_as_text(at, "compare")

    at.switch_page("views/report.py")
    at.run()
    assert_shown_as_text(at, "report")
