"""The prototype card: label, role, usage, promoted tokens, top training snippets with the
trigger token highlighted, source mix, and this session's suppress toggle and gain slider."""

from __future__ import annotations

import math

import streamlit as st

from core import AtlasTables, PrototypeIndex

from . import state
from .controls import plural
from .safe import md

SNIPPETS_SHOWN = 5
SLIDER_MAX = 3.0  # a slider reaches at least this; a larger gain widens its own slider (true values)
SUPPRESSION_WINS = (
    "Suppressed and gained: suppression wins. A suppressed prototype is removed from the "
    "candidates before the top-k choice, so it is never active and its gain has no effect "
    "(the gain is kept for when you un-suppress it)."
)


def slider_max(gain: float) -> float:
    """The gain slider's upper end: 3, or the gain rounded up, so that every gain shows as itself."""
    return max(SLIDER_MAX, float(math.ceil(gain)))


def _on_gain(widget_key: str, prototype: int) -> None:
    gain = float(st.session_state[widget_key])
    state.commit(state.current_controls().with_gain(prototype, gain), f"gain of #{prototype} set to {gain:g}")


def _on_suppress(widget_key: str, prototype: int) -> None:
    on = bool(st.session_state[widget_key])
    action = f"#{prototype} {'suppressed' if on else 'no longer suppressed'}"
    state.commit(state.current_controls().with_suppressed(prototype, on), action)


def control_widgets(prototype: int, prefix: str, max_suppressed: int) -> None:
    """The suppress toggle and gain slider of one prototype, drawn from the session's controls.

    The widgets' values always come from the controls (``value=`` and the session state of
    their keys): a widget re-created after a run that did not draw it shows the controls, not
    a leftover or default value. Only their callbacks change the controls.
    """
    controls = state.current_controls()
    gain, suppressed = controls.gain(prototype), prototype in controls.suppressed
    gain_key, supp_key = f"{prefix}_gain_{prototype}", f"{prefix}_supp_{prototype}"
    state.sync_widget(gain_key, gain)
    state.sync_widget(supp_key, suppressed)
    left, right = st.columns([2, 3])
    left.toggle(
        "Suppress",
        value=suppressed,
        key=supp_key,
        on_change=_on_suppress,
        args=(supp_key, prototype),
        disabled=not suppressed and len(controls.suppressed) >= max_suppressed,
        help="Keep this prototype out of every active set (the next one takes its place)",
    )
    right.slider(
        "Gain",
        0.0,
        slider_max(gain),
        value=gain,
        step=0.05,
        format="%.2f",
        key=gain_key,
        on_change=_on_gain,
        args=(gain_key, prototype),
        help="Multiplies this prototype's mixture weight in every prediction (1 = unchanged)",
    )
    if suppressed and gain != 1.0:
        st.caption(SUPPRESSION_WINS)


def render_card(
    index: PrototypeIndex, atlas: AtlasTables, tokenizer, prototype: int, prefix: str, max_suppressed: int
) -> None:
    """Draw one prototype's card."""
    if not 0 <= prototype < index.num_prototypes:
        st.error(f"Unknown prototype id {prototype}: this bundle has 0..{index.num_prototypes - 1}.")
        return
    j = prototype
    label = atlas.labels[j] or "unlabelled"
    with st.container(border=True):
        st.markdown(f"#### Prototype {j}")
        st.text(f"Label: {label}")
        if atlas.categories[j] or atlas.roles[j]:
            st.text(f"Category: {atlas.categories[j] or '-'}   Role: {atlas.roles[j] or '-'}")
        if atlas.descriptions[j]:
            st.text(atlas.descriptions[j])
        record = atlas.label_records.get(j)
        if record is not None and getattr(record, "fires_on", None):
            st.text("Fires on: " + "  ".join(repr(t) for t in list(record.fires_on)[:8]))
        if record is not None and getattr(record, "confidence", None) is not None:
            st.caption(
                f"Label confidence {float(record.confidence):.2f}"
                + (" · dead prototype (never active)" if getattr(record, "dead", False) else "")
            )
        st.markdown(  # one line, not three metrics: a card beside the map is narrow
            f"**Usage share** {100 * atlas.usage_share[j]:.3f}% · **active at** "
            f"{plural(int(atlas.usage_count[j]), 'position')} · **dominant source** {md(atlas.dominant[j], limit=60)}"
        )
        promoted = [tokenizer.decode([int(t)]) for t in index.promoted_token_ids[j][:8]]
        st.text("Promotes: " + "  ".join(repr(t) for t in promoted))
        mix = {s: float(m) for s, m in zip(atlas.sources, atlas.source_mix[j], strict=True) if m > 0}
        st.text("Source mix: " + ", ".join(f"{s} {100 * m:.0f}%" for s, m in sorted(mix.items(), key=lambda x: -x[1])))
        neighbours = index.neighbourhood(j)
        if neighbours:
            parts = [state.SNIPPET_CSS]
            for n in neighbours[:SNIPPETS_SHOWN]:
                tip = state.escape(
                    f"{n['doc_id']} ({n['source']}), cos {n['cosine']:.3f}{'' if n['active'] else ', not active there'}"
                )
                parts.append(
                    f'<div class="prism-snip" title="{tip}">'
                    f"{state.marked_snippet(n['snippet'], n['highlight_start'], n['highlight_end'])}</div>"
                )
            st.caption(
                f"Nearest training snippets ({plural(len(neighbours), 'position')} in the neighbourhood; "
                "trigger token marked):"
            )
            st.html("".join(parts))
        else:
            st.caption("No training positions in this prototype's neighbourhood.")
        control_widgets(j, prefix, max_suppressed)
