"""PRISM Explorer entry point: ``streamlit run explorer/app.py [-- --model DIR]``.

A router: the sidebar (bundle field, session controls summary) and st.navigation over the
pages in explorer/views/. Each page is a short script: widgets, calls into core, rendering.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `streamlit run` puts explorer/ itself on the path, not the repository
    sys.path.insert(0, str(REPO))

import os  # noqa: E402

import streamlit as st  # noqa: E402
import torch  # noqa: E402

from explorer import state  # noqa: E402

# One intra-op thread per request by default: on 2 busy cores, 64 demo tokens took 6.7 s with
# torch's 2 threads and 0.9 s with 1 (threads spin against each other and other processes).
# PRISM_EXPLORER_THREADS=0 leaves torch's setting alone (the tests do).
_threads = int(os.environ.get("PRISM_EXPLORER_THREADS", "1") or 0)
if _threads > 0 and torch.get_num_threads() != _threads:
    torch.set_num_threads(_threads)

st.set_page_config(page_title="PRISM Explorer", page_icon=":material/hub:", layout="wide")

if state.BUNDLE_PATH not in st.session_state:
    st.session_state[state.BUNDLE_PATH] = state.default_bundle_path()

with st.sidebar:
    st.markdown("### PRISM Explorer")
    st.text_input("Bundle folder", key=state.BUNDLE_PATH, help="A PRISM model folder (press Enter to open it)")

pages = [
    st.Page("views/atlas.py", title="Atlas", icon=":material/scatter_plot:", url_path="atlas", default=True),
    st.Page("views/trace.py", title="Trace", icon=":material/timeline:", url_path="trace"),
    st.Page("views/steer.py", title="Steer", icon=":material/tune:", url_path="steer"),
    st.Page("views/calibrate.py", title="Calibrate", icon=":material/model_training:", url_path="calibrate"),
    st.Page("views/report.py", title="Report", icon=":material/description:", url_path="report"),
]
page = st.navigation(pages, position="top")

loaded = state.load_current()
with st.sidebar:
    b = loaded.bundle
    cfg = b.model.config
    st.caption(
        f"Model {b.fingerprint} · {'PRISM' if b.is_prism else 'dense twin'} · "
        f"{cfg.num_prototypes:,} prototypes · k={cfg.prototype_top_k}"
    )
    if loaded.index is None:
        st.caption(f"No index: {loaded.index_error}")
    controls = state.session_controls(b.fingerprint)
    st.markdown("**Session controls**")
    if controls.is_empty:
        st.caption("none (the model as trained)")
    else:
        gains = ", ".join(f"#{j}×{g:g}" for j, g in sorted(controls.gains.items()))
        st.caption(f"gains: {gains or '-'}")
        st.caption(f"suppressed: {', '.join(f'#{j}' for j in controls.suppressed) or '-'}")
        if st.button("Clear controls", key="sidebar_clear"):
            state.apply_controls(state.Controls())
            st.rerun()

page.run()
