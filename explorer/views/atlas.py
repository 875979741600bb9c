"""Atlas: the map of all prototypes; click, box or lasso to open prototype cards beside the map;
search; filter (the rest dimmed, the view kept); a group opened or suppressed as one."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import streamlit as st

from explorer import permalink, state
from explorer.cards import render_card
from explorer.clickselect import enable_click_select
from explorer.controls import plural
from explorer.figures import atlas_figure, selected_ids
from explorer.safe import csv_frame, md, md_repr

MAP_KEY = "atlas_map"
ID_QUERY = re.compile(r"^#?(\d+)$")


def _on_map_select() -> None:
    """Copy the chart's selection into the session (a changed figure clears the chart's own)."""
    ids = selected_ids(st.session_state.get(MAP_KEY))
    if ids:
        _pick(ids)


def _pick(ids: list[int]) -> None:
    st.session_state[state.PICKED] = sorted(set(int(i) for i in ids))
    if ids:
        st.session_state["atlas_card"] = int(sorted(ids)[0])


def _suppress_group(ids: list[int], name: str) -> None:
    value = state.current_controls()
    for j in ids:
        value = value.with_suppressed(j, True)
    state.commit(value, f"suppressed the {plural(len(ids), 'prototype')} of {name}")


def search(query: str, count: int) -> list[int]:
    """Every prototype matching ``query`` (no cap): "#72" or "72" is prototype 72, plus text matches."""
    text = query.strip()
    exact = ID_QUERY.match(text)
    hits = data.search(text.lstrip("#") if exact else text, limit=None)
    if exact and int(exact.group(1)) < count:
        hits = [int(exact.group(1)), *[j for j in hits if j != int(exact.group(1))]]
    return hits


loaded = state.load_current()
state.require_prism(loaded)
data = state.atlas_data(loaded)
P = data.num_prototypes
controls = state.current_controls()

st.subheader("Atlas")
names = list(data.layouts) or [data.layout]
if st.session_state.get("atlas_layout") not in names:
    st.session_state["atlas_layout"] = data.layout  # the layout that scores best
layout_name = st.selectbox(
    "Layout",
    names,
    key="atlas_layout",
    format_func=lambda n: (
        f"{n} · structure {data.layout_scores.get(n, float('nan')):.2f}" + (" (best)" if n == data.layout else "")
    ),
    help=f"Structure: the share of each prototype's 10 nearest neighbours on the map that are in its own "
    f"group ({data.structure_of}), the kNN purity; {data.shuffled_score:.2f} if the groups were shuffled over "
    "the points. The map opens on the layout that scores best.",
)
xy = data.layouts.get(layout_name, data.xy)
st.caption(
    f"{P:,} prototypes · layout: {md(layout_name)}, kNN purity of {data.structure_of} "
    f"{data.layout_scores.get(layout_name, float('nan')):.2f} against {data.shuffled_score:.2f} shuffled"
    f"{' (the best of ' + str(len(names)) + ' layouts)' if layout_name == data.layout and len(names) > 1 else ''}"
    " · marker size: usage · click a point, or drag a box or lasso (the default), to open prototype cards "
    "beside the map · ✕ suppressed, ◇ gain ≠ 1 in this session"
)

c1, c2, c3 = st.columns([1.2, 2, 2])
colour_options = ["category", "source"] if any(data.categories) else ["source"]
colour_by = c1.segmented_control(
    "Colour by", colour_options, default=colour_options[0], key="atlas_colour", required=True
)
groups = np.asarray(data.categories if colour_by == "category" else data.dominant, dtype=object)
group_names = sorted(set(groups.tolist()))
shown_groups = [g for g in st.session_state.get("atlas_filter", []) if g in group_names]
if shown_groups != st.session_state.get("atlas_filter", []):
    st.session_state["atlas_filter"] = shown_groups  # another colouring's groups do not apply
shown_groups = c2.multiselect(
    f"Filter by {colour_by} (the rest is dimmed)",
    group_names,
    key="atlas_filter",
    placeholder=f"all {len(group_names)} {colour_by} groups",
)
query = c3.text_input(
    "Search labels and neighbourhood text",
    key="atlas_query",
    placeholder="e.g. thou, package, def, #72",
)

visible = np.isin(groups, shown_groups) if shown_groups else np.ones(P, dtype=bool)
hits = search(query, P) if query.strip() else []
picked = [j for j in st.session_state.get(state.PICKED, []) if 0 <= j < P]
ids = np.arange(P, dtype=np.int32)
hover = [f"#{j} {data.labels[j] or data.dominant[j]} · {data.top_snippet[j][:70]}" for j in ids]
fig = atlas_figure(
    xy,
    ids,
    groups.tolist(),
    data.usage_share,
    hover=hover,
    highlight=sorted(set(hits) | set(picked)),
    shown=visible,
    suppressed=sorted(controls.suppressed),
    gained=[j for j, _ in controls.gain_items],
    uirevision=f"atlas-{layout_name}",  # the view is kept across filters and searches, reset for a new layout
    dark=state.dark_theme(),
)
map_col, card_col = st.columns([3, 2])
with map_col:
    enable_click_select()
    st.plotly_chart(
        fig,
        key=MAP_KEY,
        on_select=_on_map_select,
        selection_mode=("points", "box", "lasso"),
        width="stretch",
        config={"scrollZoom": True, "displaylogo": False},
        alt=f"Map of {P:,} prototypes coloured by {colour_by}"
        + (f", {int(visible.sum()):,} in the filter" if shown_groups else ""),
    )
    if shown_groups:
        members = [int(j) for j in np.flatnonzero(visible)]
        name = ", ".join(shown_groups)
        st.caption(f"Filter: {plural(len(members), 'prototype')} in {md(name, limit=200)}; the rest dimmed.")
        g1, g2 = st.columns(2)
        g1.button(
            f"Open the {plural(len(members), 'prototype')} as cards",
            key="atlas_pick_group",
            on_click=_pick,
            args=(members,),
        )
        room = state.max_suppressed(loaded) - len(controls.suppressed - set(members))
        g2.button(
            f"Suppress the {plural(len(members), 'prototype')}",
            key="atlas_suppress_group",
            on_click=_suppress_group,
            args=(members, f"{colour_by} {name}"),
            disabled=len(members) > room,
            help="Suppress the whole group as one control (Undo in the sidebar takes it back)"
            if len(members) <= room
            else f"At most {state.max_suppressed(loaded):,} prototypes can be suppressed at once",
        )
    if query.strip():
        if hits:
            verb = "matches" if len(hits) == 1 else "match"
            st.caption(f"Search: {plural(len(hits), 'prototype')} {verb} {md_repr(query)} (outlined on the map).")
            opens = f"Open the {plural(len(hits), 'match', 'matches')} as cards" if len(hits) > 1 else "Open the match"
            st.button(opens, key="atlas_pick_hits", on_click=_pick, args=(hits,))
        else:
            st.caption(f"Search: nothing matches {md_repr(query)}.")
    with st.expander("Open a prototype by id"):
        chosen = st.number_input("Prototype id", 0, P - 1, step=1, key="atlas_open_id")
        if st.button("Open card", key="atlas_open"):
            _pick(sorted(set(picked) | {int(chosen)}))
            st.session_state["atlas_card"] = int(chosen)
            st.rerun()


@st.fragment
def card_panel(picked: list[int], view: dict) -> None:
    """The card column. Choosing another card reruns only this panel (not the map); a change of
    the controls from the card's toggle or slider reruns the whole page, so the sidebar and the
    map's marks show it."""
    state.rerun_app_if_controls_changed()
    if st.session_state.get("atlas_card") not in picked:
        st.session_state["atlas_card"] = picked[0]
    card = st.selectbox(
        f"Card ({plural(len(picked), 'prototype')} selected)",
        picked,
        key="atlas_card",
        format_func=lambda j: f"#{j} {data.labels[j] or data.dominant[j]}",
    )
    permalink.write(view | {"acard": int(card)}, controls)
    render_card(loaded.index, data, loaded.bundle.tokenizer, int(card), "atlas", state.max_suppressed(loaded))


picked = [j for j in st.session_state.get(state.PICKED, []) if 0 <= j < P]
view = {
    "bundle": loaded.name,
    "colour": colour_by,
    "q": query.strip(),
    "picked": ",".join(map(str, picked)) if len(picked) <= permalink.MAX_PICKED else None,
}
with card_col:
    if not picked:
        permalink.write(view, controls)
        st.info(
            "No prototype selected yet: click a point on the map, drag a box or lasso around several, "
            "search, or open one by id. Its card opens here."
        )
    else:
        card_panel(picked, view)

if picked:
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
        csv_frame(table),  # formula-like cells guarded, as in the report's CSV
        file_name="prototype-selection.csv",
        mime="text/csv",
        on_click="ignore",
        key="atlas_export",
    )
    if right.button("Clear selection", key="atlas_clear"):
        st.session_state[state.PICKED] = []
        st.rerun()
