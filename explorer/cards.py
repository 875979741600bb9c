"""The prototype card: label, role, usage, promoted tokens, top training snippets with the
trigger token highlighted, source mix, and this session's suppress toggle and gain slider."""

from __future__ import annotations

import streamlit as st

from core import AtlasTables, PrototypeIndex

from . import state

SNIPPETS_SHOWN = 5
MAX_GAIN = 3.0


def _on_gain(widget_key: str, prototype: int) -> None:
    state.set_gain(prototype, st.session_state[widget_key])


def _on_suppress(widget_key: str, prototype: int) -> None:
    state.set_suppressed(prototype, st.session_state[widget_key])


def control_widgets(prototype: int, prefix: str, max_suppressed: int) -> None:
    """The suppress toggle and gain slider of one prototype, bound to the session's controls."""
    gain_key, supp_key = f"{prefix}_gain_{prototype}", f"{prefix}_supp_{prototype}"
    gains = st.session_state.get(state.GAINS, {})
    suppressed = set(st.session_state.get(state.SUPPRESSED, []))
    state.sync_widget(gain_key, min(float(gains.get(prototype, 1.0)), MAX_GAIN))
    state.sync_widget(supp_key, prototype in suppressed)
    left, right = st.columns([1, 2])
    left.toggle(
        "Suppress",
        key=supp_key,
        on_change=_on_suppress,
        args=(supp_key, prototype),
        disabled=prototype not in suppressed and len(suppressed) >= max_suppressed,
        help="Keep this prototype out of every active set (the next one takes its place)",
    )
    right.slider(
        "Gain",
        0.0,
        MAX_GAIN,
        step=0.1,
        key=gain_key,
        on_change=_on_gain,
        args=(gain_key, prototype),
        help="Multiplies this prototype's mixture weight in every prediction (1 = unchanged)",
    )


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
        a, b, c = st.columns(3)
        a.metric("Usage share", f"{100 * atlas.usage_share[j]:.3f}%")
        b.metric("Active at", f"{int(atlas.usage_count[j]):,} positions")
        c.metric("Dominant source", atlas.dominant[j])
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
            st.caption(f"Nearest training snippets ({len(neighbours)} in the neighbourhood; trigger token marked):")
            st.html("".join(parts))
        else:
            st.caption("No training positions in this prototype's neighbourhood.")
        control_widgets(j, prefix, max_suppressed)
