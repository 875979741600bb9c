"""PRISM Explorer entry point: ``streamlit run explorer/app.py [-- --model DIR]``.

A router: the sidebar (bundle field, the session's controls with undo and redo) and
st.navigation over the pages in explorer/views/. Each page is a short script: widgets, calls
into core, rendering. Controls change only in widget callbacks (or before an st.rerun), so the
sidebar, drawn before the page, always shows the controls the page applies; a fragment whose
widget changed them reruns the whole app (``state.rerun_app_if_controls_changed``).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `streamlit run` puts explorer/ itself on the path, not the repository
    sys.path.insert(0, str(REPO))

import os  # noqa: E402

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402
import torch  # noqa: E402

from explorer import permalink, state  # noqa: E402
from explorer.cards import SUPPRESSION_WINS  # noqa: E402
from explorer.controls import ControlSet, plural  # noqa: E402
from explorer.safe import md  # noqa: E402

# One intra-op thread per request by default: on 2 busy cores, 64 demo tokens took 6.7 s with
# torch's 2 threads and 0.9 s with 1 (threads spin against each other and other processes).
# PRISM_EXPLORER_THREADS=0 leaves torch's setting alone (the tests do).
_threads = int(os.environ.get("PRISM_EXPLORER_THREADS", "1") or 0)
if _threads > 0 and torch.get_num_threads() != _threads:
    torch.set_num_threads(_threads)

st.set_page_config(page_title="PRISM Explorer", page_icon=":material/hub:", layout="wide")

if state.BUNDLE_PATH not in st.session_state:
    st.session_state[state.BUNDLE_PATH] = state.shown_bundle_path(state.default_bundle_path())
permalink.restore()  # a session opened from a link starts with the link's view

with st.sidebar:
    st.markdown("### PRISM Explorer")
    st.text_input(
        "Bundle folder",
        key=state.BUNDLE_PATH,
        help="A PRISM model folder among those this server offers, by name (press Enter to open it)",
    )

pages = [
    st.Page("views/atlas.py", title="Atlas", icon=":material/scatter_plot:", url_path="atlas", default=True),
    st.Page("views/trace.py", title="Trace", icon=":material/timeline:", url_path="trace"),
    st.Page("views/steer.py", title="Steer", icon=":material/tune:", url_path="steer"),
    st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("views/calibrate.py", title="Calibrate", icon=":material/model_training:", url_path="calibrate"),
    st.Page("views/report.py", title="Report", icon=":material/description:", url_path="report"),
    st.Page("views/outliers.py", title="Outliers", icon=":material/bar_chart:", url_path="outliers"),
]
page = st.navigation(pages, position="top")

loaded = state.load_current()
permalink.after_load(loaded)
with st.sidebar:
    b = loaded.bundle
    cfg = b.model.config
    st.caption(
        f"Model {b.fingerprint} · {'PRISM' if b.is_prism else 'dense twin'} · "
        f"{cfg.num_prototypes:,} prototypes · k={cfg.prototype_top_k}"
    )
    st.caption(f"Runs on {b.device} in {b.dtype}", help="Set by `-- --device D --dtype T` or $PRISM_DEVICE/DTYPE")
    if loaded.index is None:
        st.caption(f"No index: {md(loaded.index_error)}")
    history = state.history()
    controls = history.present
    st.markdown("**Session controls**")
    st.caption(controls.describe(), help="Every page generates and traces with exactly these controls")
    state.drew_controls()
    if controls.conflicts:
        st.caption(f"{plural(len(controls.conflicts), 'prototype')} both suppressed and gained. {SUPPRESSION_WINS}")
    u, r = st.columns(2)
    u.button(
        "Undo",
        key="sidebar_undo",
        on_click=state.undo,
        disabled=not history.can_undo,
        help=f"Undo: {md(history.undo_action)}" if history.can_undo else "Nothing to undo",
        width="stretch",
    )
    r.button(
        "Redo",
        key="sidebar_redo",
        on_click=state.redo,
        disabled=not history.can_redo,
        help=f"Redo: {md(history.redo_action)}" if history.can_redo else "Nothing to redo",
        width="stretch",
    )
    st.button(
        "Clear controls",
        key="sidebar_clear",
        on_click=state.commit,
        args=(ControlSet(), "cleared all controls"),
        disabled=controls.is_empty,
        help="Remove every gain and suppression (Undo brings them back)",
        width="stretch",
    )
    if not controls.is_empty:
        with st.expander(f"All {plural(len(controls.ids), 'controlled prototype')}"):
            st.dataframe(
                pd.DataFrame(
                    {
                        "prototype": controls.ids,
                        "gain": [controls.gain(j) for j in controls.ids],
                        "suppressed": [j in controls.suppressed for j in controls.ids],
                    }
                ),
                hide_index=True,
                key="sidebar_controls",
                height=min(300, 38 + 35 * len(controls.ids)),
            )

page.run()
