"""Compare: two prompts, or one prompt with and without the session's controls, side by side: the
two greedy texts, each token's probability, and where the logit of the first differing token went
(its slices under both settings, the prototypes that moved most)."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

import core
from core import Controls, ControlsError, Decomposition
from explorer import permalink, state
from explorer.comparison import differing_positions, token_rows, token_spans
from explorer.controls import plural
from explorer.safe import md, md_repr

MODES = ("one prompt: the model as trained vs the session's controls", "two prompts, the session's controls")


@st.cache_data(show_spinner=False, max_entries=64)
def decomposed(
    path: str, fingerprint: str, prompt: str, completion: str | None, max_new_tokens: int, controls_json: str
) -> Decomposition:
    """decompose() of one request (greedy when no completion), cached on all it depends on."""
    bundle = state.cached_bundle(path)
    controls = Controls.from_json(json.loads(controls_json))
    return core.decompose(
        bundle,
        prompt=prompt,
        completion=completion,
        controls=controls,
        max_new_tokens=max_new_tokens,
        generation=core.GREEDY,  # both sides greedy: a difference is the controls', not the draw's
    )


def control_note(j: int) -> str:
    if j in session.suppressed:
        return "suppressed"
    return f"gain {session.gain(j):g}" if session.gain(j) != 1 else ""


loaded = state.load_current()
bundle = loaded.bundle
st.subheader("Compare")
if not bundle.is_prism:
    st.info(f"{md(loaded.name)} is a dense twin: it has no prototypes to compare slices over.")
    st.stop()
session = state.current_controls()
mode = st.radio("Compare", MODES, key="cmp_mode")
most = max(1, min(48, bundle.model.config.get_text_config().max_position_embeddings // 2))
n = st.slider("Tokens to generate", 1, most, min(12, most), key="cmp_max_new")
none = json.dumps(Controls().to_json(), sort_keys=True)
mine = json.dumps(session.to_core(bundle.fingerprint).to_json(), sort_keys=True)
if mode == MODES[0]:
    prompt = st.text_area("Prompt", "KING.", key="cmp_prompt", height=70)
    sides = [("The model as trained", prompt, none), ("With the session's controls", prompt, mine)]
    if session.is_empty:
        st.caption("The session has no controls: both sides are the model as trained (set some on Steer).")
else:
    a, b = st.columns(2)
    prompt_a = a.text_area("Prompt A", "KING.", key="cmp_prompt_a", height=70)
    prompt_b = b.text_area("Prompt B", "HAMLET.", key="cmp_prompt_b", height=70)
    sides = [("A", prompt_a, mine), ("B", prompt_b, mine)]
permalink.write({"bundle": loaded.name})

try:
    with st.spinner("Generating both…"):
        results = [decomposed(loaded.path, bundle.fingerprint, p, None, int(n), c) for _, p, c in sides]
except (ValueError, ControlsError) as err:
    st.error(f"Cannot compare: {md(err)}")
    st.stop()

for column, (title, prompt, _), dec, other in zip(st.columns(2), sides, results, results[::-1], strict=True):
    with column:
        st.markdown(f"**{title}**")
        st.caption(f"Prompt: {md_repr(prompt)}")
        st.html(token_spans(dec, other))
left, right = results
st.markdown("**Each token's probability**")
st.dataframe(pd.DataFrame(token_rows((sides[0][0], sides[1][0]), left, right)), hide_index=True, key="cmp_table")

differs = differing_positions(left, right)
if not differs:
    st.caption("The two texts are the same token for token.")
elif mode == MODES[0] and differs[0] >= len(left.tokens):
    st.caption(f"The text as trained ends after token {len(left.tokens)}; the controlled text goes on.")
elif mode == MODES[0]:
    d = differs[0]
    token = left.tokens[d]
    # the original text scored under the controls: the same token at the same place, its slices moved
    under = decomposed(loaded.path, bundle.fingerprint, sides[0][1], left.completion, int(n), mine).tokens[d]
    before = {p.id: p.slice for p in token.prototypes}
    after = {p.id: p.slice for p in under.prototypes}
    moved = sorted(set(before) | set(after), key=lambda j: -abs(after.get(j, 0.0) - before.get(j, 0.0)))
    st.markdown(
        f"**Where the logit of {md_repr(token.token)} went** (token {d + 1}, the first that differs): "
        f"logit {token.logit:.3f} as trained, {under.logit:.3f} under the controls "
        f"(probability {token.probability:.3f} → {under.probability:.3f})"
    )
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "prototype": j,
                    "slice as trained": before.get(j, 0.0),
                    "slice under the controls": after.get(j, 0.0),
                    "change": after.get(j, 0.0) - before.get(j, 0.0),
                    "controlled": control_note(j),
                }
                for j in moved[:12]
            ]
        ),
        hide_index=True,
        key="cmp_moved",
    )
    st.caption(
        f"{plural(len(moved), 'prototype')} active at this token in either setting; the slices of each side "
        "sum exactly to its logit."
    )
else:
    st.caption(f"{plural(len(differs), 'position')} differ; the first is token {differs[0] + 1}.")
