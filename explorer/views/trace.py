"""Trace: a prompt, its generated (or pasted) completion as a token strip; for the chosen token
a waterfall of its slices summing to the logit, the alternatives, and the training examples."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

import core
from core import Attribution, Controls, ControlsError, PrototypeIndexError
from explorer import permalink, state
from explorer.cards import render_card
from explorer.controls import ControlSet, plural
from explorer.figures import grouped_slices, grouped_waterfall_figure, selected_ids, waterfall_figure
from explorer.safe import md, md_repr

DEFAULT_PROMPT = "ROMEO. But soft, what light"
WATERFALL_KEY = "trace_waterfall"
CARD_FOR = "card_trace"  # the prompt of the trace whose slice or example opened the card


@st.cache_data(show_spinner=False, max_entries=64)
def traced(
    path: str,
    fingerprint: str,
    prompt: str,
    completion: str | None,
    method: str,
    top: int,
    max_new_tokens: int,
    controls_json: str,
) -> Attribution:
    """attribute() for one request, cached on everything that determines its result."""
    bundle = state.cached_bundle(path)
    index = state.cached_index(path, fingerprint)
    controls = Controls.from_json(json.loads(controls_json))
    return core.attribute(
        bundle, index, prompt, completion, top=top, method=method, controls=controls, max_new_tokens=max_new_tokens
    )


def trace_identity(result: Attribution) -> str:
    """What a card belongs to: the traced prompt (tracing the same prompt again keeps the card open)."""
    return result.decomposition.prompt


def _open_card(prototype: int) -> None:
    st.session_state[state.CARD] = int(prototype)
    trace = st.session_state.get(state.TRACE)
    st.session_state[CARD_FOR] = trace_identity(trace) if trace is not None else None


def _on_slice_select() -> None:
    ids = selected_ids(st.session_state.get(WATERFALL_KEY))
    if ids:
        _open_card(ids[0])


@st.fragment
def token_view(result: Attribution, traced_with: ControlSet) -> None:
    """The chosen token: its slices, the card panel, alternatives and training examples. Picking
    another token or a slice reruns only this part; a control changed on the card reruns the
    whole app, so that the sidebar shows it."""
    state.rerun_app_if_controls_changed()
    dec = result.decomposition
    n = len(dec.tokens)
    if st.session_state.get("trace_token") not in range(n):
        st.session_state["trace_token"] = 0
    chips = state.unique_labels([state.visible_token(t.token) for t in dec.tokens])
    choice = st.pills(
        "Tokens (pick one)", list(range(n)), key="trace_token", selection_mode="single", format_func=lambda i: chips[i]
    )
    i = int(choice) if choice is not None else 0
    token = dec.tokens[i]
    total = sum(p.slice for p in token.prototypes)
    error = abs(total - token.logit)

    st.markdown(f"#### token {i + 1} / {n}")
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Token", md_repr(token.token))
    m2.metric("Logit", f"{token.logit:.4f}")
    m3.metric("Probability", f"{token.probability:.4f}")
    m4.metric("Σ slices", f"{total:.4f}", help="The slices of the active prototypes add up to the logit")
    st.success(
        f"Σ slices = logit (|error| = {error:.1e}) over {plural(len(token.prototypes), 'active prototype')}",
        icon=":material/check_circle:",
    )

    card = st.session_state.get(state.CARD)
    owner = st.session_state.get(CARD_FOR)
    if card is not None and owner is not None and owner != trace_identity(result):
        card = None  # it was opened from another trace: it does not follow the analyst to unrelated text
        st.session_state.pop(state.CARD, None)
    st.session_state[CARD_FOR] = trace_identity(result) if card is not None else None

    left, right = st.columns([3, 2])
    with left:
        ids = [p.id for p in token.prototypes]
        labels = [data.labels[j] for j in ids]
        fig = waterfall_figure(ids, [p.slice for p in token.prototypes], token.logit, labels)
        st.plotly_chart(
            fig,
            key=WATERFALL_KEY,
            on_select=_on_slice_select,
            selection_mode="points",
            width="stretch",
            config={"displaylogo": False},
            alt=f"Slices of token {token.token!r} summing to its logit",
        )
        st.caption("Click a slice to open its prototype card beside the chart.")
        grouping = data.categories if any(data.categories) else data.dominant
        by = "category" if any(data.categories) else "dominant source"
        if st.toggle(f"Group the slices by {by}", key="trace_group", help="Each group is the exact sum of its slices"):
            groups = grouped_slices(ids, [p.slice for p in token.prototypes], [grouping[j] for j in ids])
            st.plotly_chart(
                grouped_waterfall_figure(groups, token.logit),
                key="trace_grouped",
                width="stretch",
                config={"displaylogo": False},
                alt=f"Slices of token {token.token!r} summed by {by}",
            )
            total = sum(v for _, v, _ in groups)
            st.caption(
                f"{plural(len(groups), 'group')}; the groups sum to {total:.4f} = logit (|error| = "
                f"{abs(total - token.logit):.1e})."
            )
            slice_of = {p.id: p.slice for p in token.prototypes}
            for name, value, members in groups[:8]:
                with st.expander(f"{md(name, limit=60)}: {value:+.3f} over {plural(len(members), 'prototype')}"):
                    st.dataframe(
                        pd.DataFrame(
                            {
                                "prototype": members,
                                "label": [data.labels[j] for j in members],
                                "slice": [slice_of[j] for j in members],
                            }
                        ),
                        hide_index=True,
                        key=f"trace_group_{name}",
                    )
                    st.button(
                        "Open the strongest as a card",
                        key=f"trace_group_card_{name}",
                        on_click=_open_card,
                        args=(members[0],),
                    )
        st.markdown("**Top alternatives** (their slices over the same prototypes)")
        rows = [
            {
                "token": repr(token.token),
                "logit": token.logit,
                "probability": token.probability,
                "strongest slice": f"#{token.prototypes[0].id} {token.prototypes[0].slice:+.3f}",
            }
        ]
        for alt in token.alternatives:
            k = max(range(len(alt.slices)), key=lambda m: alt.slices[m]) if alt.slices else 0
            rows.append(
                {
                    "token": repr(alt.token),
                    "logit": alt.logit,
                    "probability": alt.probability,
                    "strongest slice": f"#{token.prototypes[k].id} {alt.slices[k]:+.3f}" if alt.slices else "",
                }
            )
        st.dataframe(
            pd.DataFrame(rows),
            hide_index=True,
            key="trace_alternatives",
            column_config={
                "logit": st.column_config.NumberColumn(format="%.3f"),
                "probability": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="%.3f"),
            },
        )
    with right:
        if card is None:
            st.info("Click a slice of the chart, or a card button beside a training example: its card opens here.")
        else:
            c_title, c_close = st.columns([4, 1])
            c_title.markdown(f"**Prototype card** (from this trace, token {i + 1})")
            c_close.button("Close", key="trace_card_close", on_click=lambda: st.session_state.pop(state.CARD, None))
            render_card(index, data, bundle.tokenizer, int(card), "trace", state.max_suppressed(loaded))

    st.markdown(f"**Training examples behind this token** ({result.method}; scores: {result.measurement})")
    if result.method == "influence":
        st.caption(
            "Ranked by relative score: the score over the size of the document's gradient, so that "
            "a document ranks by how closely what it teaches points along this token's loss, not by "
            "its length. The score itself is the predicted change of the loss (+ = the document lowers it)."
        )
    if result.method == "neighbourhood":
        st.caption(
            "Exemplars of the active prototypes: what each prototype stands for, not which training "
            "document taught the model this token. Influence and verbatim-span attribution need the "
            "bundle's influence store and span index (`prism index`)."
        )
    examples = result.token_examples[i]  # as many as "Examples per token" asked for when this was traced
    if not examples:
        st.caption("No training examples were credited for this token.")
    else:
        asked = st.session_state.get("trace_top_used", len(examples))
        st.caption(f"{plural(len(examples), 'example')} shown (Examples per token was {asked} for this trace).")
    for rank, e in enumerate(examples, start=1):
        a, b = st.columns([6, 1])
        # an influence score is a signed change of the loss, shown with its sign like its relative score
        score = f"score {e.score:.3f}" if e.relative is None else f"score {e.score:+.3f} (relative {e.relative:+.3f})"
        a.html(
            state.SNIPPET_CSS + f'<div class="prism-snip" title="{state.escape(e.doc_id)}"><b>{rank}.</b> '
            f"{score} · {state.escape(e.source)} · {state.escape(e.doc_id)}<br>"
            f"{state.marked_snippet(e.snippet, e.highlight_start, e.highlight_end)}</div>"
        )
        if e.prototype >= 0:  # verbatim-span examples come from no prototype
            b.button(f"card #{e.prototype}", key=f"trace_example_card_{rank}", on_click=_open_card, args=(e.prototype,))

    request = st.session_state.get("trace_request") or {}
    permalink.write(
        {
            "bundle": loaded.name,
            **request,
            "token": i,
            "card": st.session_state.get(state.CARD),
        },
        traced_with,
    )
    st.caption(
        "Permalink: this page's address now holds the bundle, prompt, token, open card and the trace's controls; "
        "copy it from the address bar to share this view or to come back to it."
    )


loaded = state.load_current()
state.require_prism(loaded)
bundle, index = loaded.bundle, loaded.index
data = state.atlas_data(loaded)

st.subheader("Trace")
prompt = st.text_area("Prompt", DEFAULT_PROMPT, key="trace_prompt", height=80)
c1, c2, c3, c4 = st.columns([1.4, 1, 1, 1])
mode = c1.radio(
    "Completion",
    ["generate", "score my own"],
    key="trace_mode",
    horizontal=True,
    help="Generate with the session's controls and the default settings, chosen by bench/generation.py: "
    f"{core.DEFAULT_GENERATION.describe(0)}; or paste a completion to score",
)
most = max(1, min(64, bundle.model.config.get_text_config().max_position_embeddings // 2))
wanted_method = st.session_state.pop("_permalink_method", None)
if wanted_method in (core.AUTO_METHOD, *core.METHODS):
    st.session_state["trace_method"] = wanted_method
if st.session_state.get("trace_max_new", 1) > most:
    st.session_state["trace_max_new"] = most
max_new = c2.slider("Tokens to generate", 1, most, min(16, most), key="trace_max_new", disabled=mode != "generate")
method = c3.selectbox(
    "Attribution method",
    [core.AUTO_METHOD, *core.METHODS],
    key="trace_method",
    help="influence: which training documents taught the model this (influence functions on the "
    "prototype blocks); spans: documents that hold the text verbatim; neighbourhood: exemplars of "
    "the active prototypes, i.e. what each prototype stands for, not which document taught it; "
    "auto: the first of influence, spans, neighbourhood that this bundle's index has",
)
top = c4.number_input("Examples per token", 1, 50, 10, key="trace_top")
completion = None
if mode == "score my own":
    completion = st.text_area("Completion to score", "", key="trace_completion", height=68)
submitted = st.button("Trace", type="primary", key="trace_run", shortcut="Ctrl+Enter")
opened_from_link = st.session_state.pop("trace_autorun", False)  # a permalink traces its prompt once

if submitted or opened_from_link:
    controls = state.session_controls(bundle.fingerprint)
    with st.spinner("Generating and tracing…" if completion is None else "Tracing…"):
        try:
            result = traced(
                loaded.path,
                bundle.fingerprint,
                prompt,
                completion,
                method,
                int(top),
                int(max_new),
                json.dumps(controls.to_json(), sort_keys=True),
            )
        except (ValueError, ControlsError, PrototypeIndexError) as err:
            st.error(f"Cannot trace: {md(err)}")
            st.stop()
    st.session_state[state.TRACE] = result
    st.session_state[state.TRACE_CONTROLS] = controls
    st.session_state["trace_top_used"] = int(top)
    st.session_state["trace_request"] = {
        "prompt": prompt,
        "mode": mode,
        "completion": completion,
        "n": int(max_new),
        "method": method,
        "top": int(top),
    }
    wanted = st.session_state.pop("trace_token_wanted", 0)
    st.session_state["trace_token"] = wanted if 0 <= wanted < len(result.decomposition.tokens) else 0

result: Attribution | None = st.session_state.get(state.TRACE)
if result is None:
    st.info(
        "Enter a prompt and press Trace: the model generates a completion (or scores yours), and every "
        "token's logit is split into the slices of its prototypes."
    )
    st.stop()

dec = result.decomposition
used = st.session_state.get(state.TRACE_CONTROLS)
st.markdown("**Prompt**")
st.text(dec.prompt)
how = core.describe_generation(dec.generation) if dec.generated else "scored"
traced_with = ControlSet() if used is None else ControlSet.from_core(used)
if traced_with.is_empty:
    st.markdown(f"**Completion** ({how}, no controls)")
else:
    st.markdown(f"**Completion** ({how} with the controls {traced_with.describe()})")
if traced_with != state.current_controls():
    st.caption("The session's controls have changed since this trace: press Trace to trace with them.")
st.text(dec.completion)
if dec.truncated_tokens:
    st.warning(f"The prompt was truncated: its first {dec.truncated_tokens} tokens were dropped to fit the context.")
token_view(result, traced_with)
