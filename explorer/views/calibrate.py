"""Calibrate: fit controller gains on a multiple-choice task, compare held-out accuracy before
and after, see the prototypes that moved, and apply the result to the session's controls."""

from __future__ import annotations

import json
import time

import pandas as pd
import streamlit as st

import core
from core import TaskError
from explorer import permalink, state
from explorer.controls import plural
from explorer.safe import md

TASKS = state.REPO / "assets" / "tasks"
MAX_UPLOAD_BYTES = 10_000_000  # a task file here; `prism calibrate` takes any size
MAX_ITEMS_READ = 5_000  # rows read from an upload (the rest are ignored, and the page says so)
MAX_ITEMS_USED = 500  # items one Fit may use: about a minute on 2 CPU cores for the demo model
MAX_STEPS = 400
PENALTIES = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # the slider's stops; the library's default is always one


def _apply(gains: dict[int, float]) -> None:
    """Apply Calibrate's gains to the session (a callback: it runs before the sidebar is drawn)."""
    state.commit(state.current_controls().with_gains(gains), f"applied {plural(len(gains), 'calibrated gain')}")
    st.session_state["cal_applied"] = len(gains)


loaded = state.load_current()
bundle = loaded.bundle
st.subheader("Calibrate")
permalink.write({"bundle": loaded.name})
if not bundle.is_prism:
    st.info(f"{md(loaded.name)} is a dense twin: it has no prototypes to calibrate.")
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


def parsed_upload(upload) -> tuple[list, str, int]:
    """(items, name, rows ignored) of an uploaded task, parsed once per file (keyed by its file id).

    Raises TaskError for a file over MAX_UPLOAD_BYTES or with a bad row; reads at most
    MAX_ITEMS_READ rows.
    """
    cached = st.session_state.get("cal_upload_parsed")
    if cached is None or cached[0] != upload.file_id:
        try:
            if upload.size > MAX_UPLOAD_BYTES:
                raise TaskError(
                    f"{upload.name} has {upload.size:,} bytes; a task uploaded here has at most "
                    f"{MAX_UPLOAD_BYTES:,} (`prism calibrate --task FILE` takes any size)"
                )
            lines = [x for x in upload.getvalue().decode("utf-8").splitlines() if x.strip()]
            items = core.read_task_lines(lines[:MAX_ITEMS_READ], upload.name)
            cached = (upload.file_id, (items, upload.name, max(0, len(lines) - MAX_ITEMS_READ)))
        except (TaskError, UnicodeDecodeError) as err:
            cached = (upload.file_id, TaskError(str(err)))  # a bad file is not re-parsed either
        st.session_state["cal_upload_parsed"] = cached
    if isinstance(cached[1], TaskError):
        raise cached[1]
    return cached[1]


items, task_name, ignored = None, None, 0
try:
    if source == "demo task" and demo_tasks:
        path = st.selectbox("Demo task", demo_tasks, key="cal_task", format_func=lambda p: p.stem)
        items, task_name = core.load_task(path), path.stem
    else:
        upload = st.file_uploader(
            "Task file (JSONL)",
            type=["jsonl", "json"],
            key="cal_upload",
            help=f"At most {MAX_UPLOAD_BYTES // 1_000_000} MB; the first {MAX_ITEMS_READ:,} rows are read",
            max_upload_size=MAX_UPLOAD_BYTES // 1_000_000,  # the box states the same limit as the help
        )
        if upload is not None:
            items, task_name, ignored = parsed_upload(upload)
except (TaskError, UnicodeDecodeError, OSError) as err:
    st.error(f"Cannot read the task: {md(str(err)[:500])}")
    st.stop()
if items is None:
    st.info("Pick a demo task or upload a task file.")
    st.stop()

defaults = core.CalibrationArguments()  # the library's defaults, as `prism calibrate` uses them
c1, c2, c3, c4 = st.columns(4)
usable = min(len(items), MAX_ITEMS_USED)
limit = c1.number_input(
    "Items used",
    2,
    usable,
    min(usable, 200),
    key="cal_limit",
    help=f"At most {MAX_ITEMS_USED:,} here (`prism calibrate` has no cap)",
)
holdout = c2.slider("Held out", 0.1, 0.9, defaults.holdout, step=0.05, key="cal_holdout")
steps = c3.slider("Steps", 10, MAX_STEPS, min(defaults.steps, MAX_STEPS), step=10, key="cal_steps")
penalty = c4.select_slider(
    "Sparsity penalty", sorted({*PENALTIES, defaults.penalty}), defaults.penalty, key="cal_penalty"
)
note = f" ({plural(ignored, 'row')} after the first {MAX_ITEMS_READ:,} not read)" if ignored else ""
capped = f"; at most {MAX_ITEMS_USED:,} items and {MAX_STEPS} steps per fit here" if len(items) > MAX_ITEMS_USED else ""
st.caption(f"{md(task_name)}: {plural(len(items), 'item')}{note}, {int(limit):,} used{capped}.")

if st.session_state.pop("cal_cancelled", False):
    st.info("Calibration cancelled: nothing was applied (the previous result, if any, is kept).")
if st.button("Fit", type="primary", key="cal_fit"):
    # Any widget event reruns the page and stops this run at its next progress update, so the
    # Cancel button (drawn before the work starts) ends the fit; its result is never stored.
    st.button("Cancel", key="cal_cancel", on_click=lambda: st.session_state.update(cal_cancelled=True))
    bar = st.progress(0, text="Scoring the choices…")
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        elapsed = time.monotonic() - started
        eta = f", about {elapsed / done * (total - done):,.0f} s left" if done else ""
        bar.progress(min(1.0, done / max(total, 1)), text=f"Calibrating: {done}/{total} ({elapsed:,.0f} s{eta})")

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
        st.error(f"Calibration failed: {md(err)}")
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
