"""Calibrate: fit controller gains on a multiple-choice task, compare held-out accuracy before
and after, see the prototypes that moved, and apply the result to the session's controls."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

import core
from core import TaskError
from explorer import state
from explorer.controls import plural

TASKS = state.REPO / "assets" / "tasks"
PENALTIES = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # the slider's stops; the library's default is always one


def _apply(gains: dict[int, float]) -> None:
    """Apply Calibrate's gains to the session (a callback: it runs before the sidebar is drawn)."""
    state.commit(state.current_controls().with_gains(gains), f"applied {plural(len(gains), 'calibrated gain')}")
    st.session_state["cal_applied"] = len(gains)


loaded = state.load_current()
bundle = loaded.bundle
st.subheader("Calibrate")
if not bundle.is_prism:
    st.info(f"{loaded.path} is a dense twin: it has no prototypes to calibrate.")
    st.stop()

st.caption(
    'A task is JSONL rows {"prompt", "choices": [...], "answer": index}; each choice is scored by '
    "its mean log-probability after the prompt. Gains are fitted on part of the task and measured on the "
    "rest with real forward passes."
)
demo_tasks = sorted(TASKS.glob("*.jsonl")) if TASKS.is_dir() else []
source = st.radio(
    "Task",
    ["demo task", "upload"],
    horizontal=True,
    key="cal_source",
    disabled=not demo_tasks,
    index=0 if demo_tasks else 1,
)
items, task_name = None, None
try:
    if source == "demo task" and demo_tasks:
        path = st.selectbox("Demo task", demo_tasks, key="cal_task", format_func=lambda p: p.stem)
        items, task_name = core.load_task(path), path.stem
    else:
        upload = st.file_uploader("Task file (JSONL)", type=["jsonl", "json"], key="cal_upload")
        if upload is not None:
            lines = upload.getvalue().decode("utf-8").splitlines()
            items, task_name = core.read_task_lines(lines, upload.name), upload.name
except (TaskError, UnicodeDecodeError, OSError) as err:
    st.error(f"Cannot read the task: {err}")
    st.stop()
if items is None:
    st.info("Pick a demo task or upload a task file.")
    st.stop()

defaults = core.CalibrationArguments()  # the library's defaults, as `prism calibrate` uses them
c1, c2, c3, c4 = st.columns(4)
limit = c1.number_input("Items used", 2, len(items), min(len(items), 200), key="cal_limit")
holdout = c2.slider("Held out", 0.1, 0.9, defaults.holdout, step=0.05, key="cal_holdout")
steps = c3.slider("Steps", 10, 400, defaults.steps, step=10, key="cal_steps")
penalty = c4.select_slider(
    "Sparsity penalty", sorted({*PENALTIES, defaults.penalty}), defaults.penalty, key="cal_penalty"
)
st.caption(f"{task_name}: {plural(len(items), 'item')}, {int(limit):,} used.")

if st.button("Fit", type="primary", key="cal_fit"):
    bar = st.progress(0, text="Scoring the choices…")

    def progress(done: int, total: int) -> None:
        bar.progress(min(1.0, done / max(total, 1)), text=f"Calibrating: {done}/{total}")

    try:
        result = core.calibrate(
            bundle,
            items[: int(limit)],
            holdout=float(holdout),
            penalty=float(penalty),
            steps=int(steps),
            index=loaded.index,
            progress=progress,
        )
    except (TaskError, ValueError) as err:
        bar.empty()
        st.error(f"Calibration failed: {err}")
        st.stop()
    bar.empty()
    st.session_state["cal_result"] = result

result = st.session_state.get("cal_result")
if result is None:
    st.stop()
if result.controls.model_fingerprint and result.controls.model_fingerprint != bundle.fingerprint:
    st.session_state.pop("cal_result")
    st.stop()
m1, m2, m3, m4 = st.columns(4)
m1.metric("Held-out accuracy before", f"{100 * result.before:.1f}%")
m2.metric("Held-out accuracy after", f"{100 * result.after:.1f}%", f"{100 * (result.after - result.before):+.1f} pts")
m3.metric(
    "Calibration split",
    f"{100 * result.calibration_after:.1f}%",
    f"{100 * (result.calibration_after - result.calibration_before):+.1f} pts",
)
m4.metric("Gains changed", f"{result.changed}")
st.caption(f"{plural(result.calibration_items, 'calibration item')}, {plural(result.holdout_items, 'item')} held out.")
if result.moved:
    st.markdown("**Prototypes that moved most**")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "prototype": m["id"],
                    "gain": m["gain"],
                    "label": m.get("label") or "",
                    "nearest training snippet": (m["examples"][0]["snippet"] if m.get("examples") else ""),
                }
                for m in result.moved
            ]
        ),
        hide_index=True,
        key="cal_moved",
    )
a, b = st.columns(2)
a.button(
    "Apply to this session's controls",
    key="cal_apply",
    disabled=not result.controls.gains,
    on_click=_apply,
    args=(dict(result.controls.gains),),
    help="Adds the fitted gains to the session's controls (replacing those prototypes' gains; suppressions kept)",
)
if st.session_state.get("cal_applied") is not None:
    applied = st.session_state.pop("cal_applied")
    st.success(
        f"Applied {plural(applied, 'gain')} (suppressions kept): the sidebar lists them, the Steer page "
        "edits them, and Undo in the sidebar takes them back."
    )
b.download_button(
    "Download result (JSON)",
    json.dumps(result.to_json(), indent=2),
    file_name="calibration.json",
    mime="application/json",
    on_click="ignore",
    key="cal_download",
)
