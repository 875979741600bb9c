"""Atlas: the map of all prototypes; click or lasso to open prototype cards; search; filter."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from explorer import state
from explorer.cards import render_card
from explorer.controls import plural
from explorer.figures import atlas_figure, selected_ids

MAP_KEY = "atlas_map"
CARDS_SHOWN = 4


def _on_map_select() -> None:
    """Copy the chart's selection into the session (a changed figure clears the chart's own)."""
    ids = selected_ids(st.session_state.get(MAP_KEY))
    if ids:
        st.session_state[state.PICKED] = ids
        st.session_state["atlas_card"] = ids[0]


def _pick(ids: list[int]) -> None:
    st.session_state[state.PICKED] = sorted(set(int(i) for i in ids))
    if ids:
        st.session_state["atlas_card"] = int(ids[0])


loaded = state.load_current()
state.require_prism(loaded)
data = state.atlas_data(loaded)
P = data.num_prototypes

st.subheader("Atlas")
st.caption(
    f"{P:,} prototypes · layout: {data.layout} · marker size: usage · click a point, or drag a box or "
    "lasso, to open prototype cards"
)

c1, c2, c3 = st.columns([1.2, 2, 2])
colour_options = ["category", "source"] if any(data.categories) else ["source"]
colour_by = c1.segmented_control(
    "Colour by", colour_options, default=colour_options[0], key="atlas_colour", required=True
)
groups = np.asarray(data.categories if colour_by == "category" else data.dominant, dtype=object)
group_names = sorted(set(groups.tolist()))
shown_groups = c2.multiselect(
    f"Filter by {colour_by}", group_names, key="atlas_filter", placeholder=f"all {len(group_names)} {colour_by} groups"
)
query = c3.text_input("Search labels and neighbourhood text", key="atlas_query", placeholder="e.g. thou, package, def")

visible = np.isin(groups, shown_groups) if shown_groups else np.ones(P, dtype=bool)
hits = data.search(query) if query.strip() else []
picked = [j for j in st.session_state.get(state.PICKED, []) if 0 <= j < P]
ids = np.flatnonzero(visible).astype(np.int32)
hover = [f"#{j} {data.labels[j] or data.dominant[j]} · {data.top_snippet[j][:70]}" for j in ids]
fig = atlas_figure(
    data.xy[ids],
    ids,
    groups[ids].tolist(),
    data.usage_share[ids],
    hover=hover,
    highlight=sorted(set(hits) | set(picked)),
)
st.plotly_chart(
    fig,
    key=MAP_KEY,
    on_select=_on_map_select,
    selection_mode=("points", "box", "lasso"),
    width="stretch",
    config={"scrollZoom": True, "displaylogo": False},
    alt=f"Map of {len(ids):,} prototypes coloured by {colour_by}",
)
if query.strip():
    if hits:
        verb = "matches" if len(hits) == 1 else "match"
        st.caption(f"Search: {plural(len(hits), 'prototype')} {verb} {query!r} (outlined on the map).")
        n = min(len(hits), 200)
        opens = f"Open the {plural(n, 'match', 'matches')} as cards" if n > 1 else "Open the match as a card"
        if st.button(opens, key="atlas_pick_hits"):
            _pick(hits)
            st.rerun()
    else:
        st.caption(f"Search: nothing matches {query!r}.")

with st.expander("Open a prototype by id"):
    chosen = st.number_input("Prototype id", 0, P - 1, step=1, key="atlas_open_id")
    if st.button("Open card", key="atlas_open"):
        _pick(sorted(set(picked) | {int(chosen)}))
        st.session_state["atlas_card"] = int(chosen)
        st.rerun()

picked = [j for j in st.session_state.get(state.PICKED, []) if 0 <= j < P]
if not picked:
    st.info(
        "No prototype selected yet: click a point on the map, drag a box or lasso around several, "
        "search, or open one by id."
    )
    st.stop()

table = pd.DataFrame(
    {
        "prototype": picked,
        "label": [data.labels[j] for j in picked],
        "category": [data.categories[j] for j in picked],
        "dominant source": [data.dominant[j] for j in picked],
        "usage %": [100 * float(data.usage_share[j]) for j in picked],
        "top snippet": [data.top_snippet[j] for j in picked],
    }
)
st.markdown(f"**Selection: {plural(len(picked), 'prototype')}**")
st.dataframe(
    table,
    hide_index=True,
    height=min(300, 38 + 35 * len(picked)),
    key="atlas_table",
    column_config={"usage %": st.column_config.NumberColumn(format="%.3f")},
)
left, right = st.columns([1, 1])
left.download_button(
    "Export selection (CSV)",
    table.to_csv(index=False),
    file_name="prototype-selection.csv",
    mime="text/csv",
    on_click="ignore",
    key="atlas_export",
)
if right.button("Clear selection", key="atlas_clear"):
    st.session_state[state.PICKED] = []
    st.rerun()

if st.session_state.get("atlas_card") not in picked:
    st.session_state["atlas_card"] = picked[0]
card = st.selectbox(
    "Card", picked, key="atlas_card", format_func=lambda j: f"#{j} {data.labels[j] or data.dominant[j]}"
)
render_card(loaded.index, data, loaded.bundle.tokenizer, int(card), "atlas", state.max_suppressed(loaded))
