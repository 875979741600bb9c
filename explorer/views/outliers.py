"""Outliers: the training documents by self-influence per token, the influence of a document's
own gradient on its own loss (g_D^T A g_D over its positions). High: text the model finds unusual
or had to memorise (tables, ASCII art, long identifiers, near-duplicates). Read from the index's
self-influence file (the demo ships it) or its influence store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.attribution.influence import outliers
from core.errors import InfluenceError
from explorer import permalink, state
from explorer.safe import csv_cell, html_text, md

LISTED = 500  # documents read with their text (the histogram has every document)
TEXT = 200  # characters of each shown


@st.cache_data(show_spinner=False, max_entries=4)
def listed(path: str, fingerprint: str) -> dict:
    """The top LISTED documents with the start of their text (what the table shows), and every
    document's score and source; kept small, as the cache hands a copy to every rerun."""
    found = outliers(path, top=LISTED)
    found["records"] = [{**r, "text": " ".join(r["text"].split())[:TEXT]} for r in found["records"]]
    return found


def histogram(scores: np.ndarray, sources: np.ndarray, chosen: list[str]) -> go.Figure:
    """log10 self-influence per token, one overlaid histogram per source (names escaped)."""
    fig = go.Figure()
    positive = scores > 0
    for source in chosen:
        values = np.log10(scores[positive & (sources == source)])
        fig.add_trace(go.Histogram(x=values, name=html_text(source), opacity=0.6, nbinsx=60))
    fig.update_layout(
        barmode="overlay",
        height=300,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        xaxis_title="log10 self-influence per token",
        yaxis_title="documents (log scale)",
        yaxis_type="log",
        legend_title_text="source",
    )
    return fig


loaded = state.load_current()
st.subheader("Outliers")
permalink.write({"bundle": loaded.name})
if not loaded.bundle.is_prism:
    st.info(f"{md(loaded.name)} is a dense twin: it has no prototype blocks to measure self-influence in.")
    st.stop()
try:
    with st.spinner("Reading the training documents' self-influence…"):
        found = listed(loaded.path, loaded.bundle.fingerprint)
except InfluenceError as err:
    shown = str(err).replace(loaded.path, loaded.name)  # no server paths on screen
    st.info(
        f"This bundle's index has no self-influence of its training documents: {md(shown)}. "
        "`prism index` builds it with the influence factors."
    )
    st.stop()

st.caption(
    "Self-influence per token: the influence a training document has on its own loss "
    "(g^T A g of its summed prototype-block gradient, A the inverse curvature), over its tokens. "
    "A high score marks text the model finds unusual or had to memorise; these are the documents "
    "to check first for noise, duplicates and leaked data."
)
scores, sources = found["all_scores"], found["all_sources"]
names = sorted(set(sources.tolist()))
chosen = st.multiselect("Sources", names, default=names, key="out_sources", placeholder="every source")
chosen = chosen or names
most = len(found["records"])
count = st.slider("Documents to list", 5, most, min(25, most), key="out_count") if most > 5 else most
st.plotly_chart(
    histogram(scores, sources, chosen),
    key="out_hist",
    config={"displaylogo": False},
    alt="Histogram of log10 self-influence per token by source",
)
rows = [r for r in found["records"] if r["source"] in chosen][:count]
table = pd.DataFrame(
    [
        {
            "rank": r["rank"],
            "self-influence / token": r["self_influence_per_token"],
            "tokens": r["positions"],
            "document": r["doc_id"],
            "source": r["source"],
            "text": r["text"],
        }
        for r in rows
    ]
)
st.dataframe(table, hide_index=True, key="out_table")
st.caption(
    f"{len(rows)} of {found['documents']:,} training documents ({found['measure']}); ranks are over every "
    f"source, the {LISTED} highest are listed."
)
st.download_button(
    "Download CSV",
    table.map(csv_cell).to_csv(index=False),
    file_name="outliers.csv",
    mime="text/csv",
    on_click="ignore",
    key="out_csv",
)
