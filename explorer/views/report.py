"""Report: export the current trace (prompt, completion, slices, ranked training examples,
controls in force, model fingerprint) as self-contained HTML, JSON or CSV."""

from __future__ import annotations

import streamlit as st

from core import report as reports
from explorer import state
from explorer.figures import waterfall_figure

loaded = state.load_current()
st.subheader("Report")
result = st.session_state.get(state.TRACE)
if result is None:
    st.info("Nothing to report yet: trace a prompt on the Trace page first. The same report for a file of "
            "prompts: `prism report --prompts FILE --out report.html`.")
    st.stop()

controls = st.session_state.get(state.TRACE_CONTROLS)
report = reports.report_from_attributions([result], controls)
dec = result.decomposition
st.markdown(f"Trace of {len(dec.tokens)} tokens · method {result.method} · model {result.model_fingerprint} · "
            f"controls: {'none' if controls is None or controls.is_empty else controls.to_json()}")
st.text(dec.prompt + dec.completion)
stem = f"prism-report-{result.model_fingerprint}"
c1, c2, c3 = st.columns(3)
c1.download_button("Download HTML (offline)", reports.to_html(report), file_name=f"{stem}.html", mime="text/html",
                   on_click="ignore", key="report_html", type="primary")
c2.download_button("Download JSON", reports.to_json(report), file_name=f"{stem}.json", mime="application/json",
                   on_click="ignore", key="report_json")
c3.download_button("Download CSV", reports.to_csv(report), file_name=f"{stem}.csv", mime="text/csv",
                   on_click="ignore", key="report_csv")
with st.expander("Preview: the first token's slices (the HTML report draws the same chart as inline SVG)",
                 expanded=True):
    token = dec.tokens[0]
    ids = [p.id for p in token.prototypes]
    labels = [result.labels.get(j) or "" for j in ids]
    st.plotly_chart(waterfall_figure(ids, [p.slice for p in token.prototypes], token.logit, labels), key="report_chart",
                    config={"displaylogo": False}, alt=f"Slices of the first token {token.token!r}")
with st.expander("JSON"):
    st.json(report, expanded=1)
