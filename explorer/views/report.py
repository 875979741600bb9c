"""Report: export the current trace (prompt, completion, slices, ranked training examples,
controls in force, model fingerprint) as self-contained HTML, JSON or CSV."""

from __future__ import annotations

import time

import streamlit as st

import core
from core import Controls
from explorer import permalink, state
from explorer.controls import ControlSet, plural
from explorer.export import file_stem, report_for_download
from explorer.figures import waterfall_figure

DOWNLOADS = (
    ("html", "Download HTML (offline)", "text/html"),
    ("json", "Download JSON", "application/json"),
    ("csv", "Download CSV", "text/csv"),
)  # (report format, button label, MIME type)


loaded = state.load_current()
st.subheader("Report")
permalink.write({"bundle": loaded.name})
result = st.session_state.get(state.TRACE)
if result is None:
    st.info(
        "Nothing to report yet: trace a prompt on the Trace page first. The same report for a file of "
        "prompts: `prism report --prompts FILE --out report.html`."
    )
    st.stop()

controls = st.session_state.get(state.TRACE_CONTROLS)
dec = result.decomposition
chips = [f"{t.position + 1}: {t.token!r}" for t in dec.tokens]  # options are plain text
chosen = st.multiselect(
    "Tokens to include",
    list(range(len(dec.tokens))),
    key="report_tokens",
    format_func=lambda i: chips[i],
    placeholder=f"all {len(dec.tokens)} tokens",
    help="Leave empty for every token of the completion",
)
report = report_for_download(result, controls, loaded.name, chosen)
st.markdown(
    f"Trace of {plural(len(dec.tokens), 'token')} · method {result.method} · model {result.model_fingerprint} · "
    f"controls: {ControlSet.from_core(controls or Controls()).describe()}"
)
st.text(dec.prompt + dec.completion)
stem = file_stem(dec.prompt, time.gmtime())
for column, (fmt, label, mime) in zip(st.columns(len(DOWNLOADS)), DOWNLOADS, strict=True):
    column.download_button(
        label,
        core.render_report(report, fmt),
        file_name=f"{stem}.{fmt}",
        mime=mime,
        on_click="ignore",
        key=f"report_{fmt}",
        type="primary" if fmt == "html" else "secondary",
    )
with st.expander(
    "Preview: the first token's slices (the HTML report draws the same chart as inline SVG)", expanded=True
):
    token = dec.tokens[0]
    ids = [p.id for p in token.prototypes]
    labels = [result.labels.get(j) or "" for j in ids]
    st.plotly_chart(
        waterfall_figure(ids, [p.slice for p in token.prototypes], token.logit, labels),
        key="report_chart",
        config={"displaylogo": False},
        alt=f"Slices of the first token {token.token!r}",
    )
with st.expander("JSON"):
    st.json(report, expanded=1)
