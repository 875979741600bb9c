"""Steer: the session's gains and suppressions, live regeneration with a fixed seed, the steered
text beside the original with differing tokens marked, perplexities, targeting, save/load."""

from __future__ import annotations

import json
import time

import streamlit as st

import core
from core import BehaviourError, Controls, ControlsError
from explorer import state
from explorer.cards import MAX_GAIN, control_widgets

DEFAULT_PROMPT = "KING."
BEHAVIOURS = state.REPO / "assets" / "behaviours"


@st.cache_data(show_spinner=False, max_entries=128)
def generated(
    path: str,
    fingerprint: str,
    prompt: str,
    max_new_tokens: int,
    seed: int,
    sample: bool,
    temperature: float,
    controls_json: str,
) -> dict:
    """One generation with its per-token strings and perplexities (cached per request)."""
    bundle = state.cached_bundle(path)
    controls = Controls.from_json(json.loads(controls_json))
    t0 = time.perf_counter()
    result = core.generate_text(
        bundle,
        prompt,
        max_new_tokens=max_new_tokens,
        controls=controls,
        seed=seed,
        do_sample=sample,
        temperature=temperature,
    )
    seconds = time.perf_counter() - t0
    return {
        "text": result.text,
        "ids": result.new_ids,
        "tokens": [bundle.tokenizer.decode([t]) for t in result.new_ids],
        "ppl_own": core.continuation_perplexity(bundle, result.prompt_ids, result.new_ids, controls),
        "ppl_base": core.continuation_perplexity(bundle, result.prompt_ids, result.new_ids, None),
        "notice": result.notice,
        "seconds": seconds,
    }


def token_html(tokens: list[str], different: frozenset[int]) -> str:
    """Escaped token spans; the tokens at positions ``different`` get class diff."""
    spans = []
    for position, text in enumerate(tokens):
        differs = position in different
        spans.append(f'<span class="prism-tok{" diff" if differs else ""}">{state.escape(text)}</span>')
    return state.SNIPPET_CSS + '<div class="prism-snip">' + "".join(spans) + "</div>"


def _add_row() -> None:
    state.set_gain(
        int(st.session_state["steer_add_id"]),
        float(st.session_state.get(state.GAINS, {}).get(int(st.session_state["steer_add_id"]), 1.0)),
    )


def _remove_row(prototype: int) -> None:
    gains = dict(st.session_state.get(state.GAINS, {}))
    gains.pop(prototype, None)
    st.session_state[state.GAINS] = gains
    state.set_suppressed(prototype, False)


loaded = state.load_current()
bundle = loaded.bundle
if not bundle.is_prism:
    st.info(f"{loaded.path} is a dense twin: it has no prototypes to steer. Open a PRISM bundle in the sidebar.")
    st.stop()
P = bundle.model.config.num_prototypes
data = state.atlas_data(loaded) if loaded.index is not None else None

st.subheader("Steer")
prompt = st.text_area("Prompt", DEFAULT_PROMPT, key="steer_prompt", height=70)
c1, c2, c3, c4 = st.columns(4)
context = bundle.model.config.get_text_config().max_position_embeddings
most = max(8, min(128, context // 2 // 8 * 8))
max_new = c1.slider("Tokens", 8, most, min(64, most), step=8, key="steer_max_new")
seed = c2.number_input("Seed", 0, 2**31 - 1, 0, key="steer_seed")
sample = c3.toggle("Sample", key="steer_sample", help="Sample instead of greedy decoding (same seed both sides)")
temperature = c4.slider("Temperature", 0.1, 2.0, 0.8, step=0.1, key="steer_temperature", disabled=not sample)

st.markdown("**Controls of this session** (from any page; every change regenerates)")
rows = sorted(set(st.session_state.get(state.GAINS, {})) | set(st.session_state.get(state.SUPPRESSED, [])))
if not rows:
    st.caption(
        "No controls yet: add a prototype below, or use the suppress toggle and gain slider of a "
        "prototype card on the Atlas or Trace page."
    )
for j in rows:
    name, controls_col, remove_col = st.columns([2, 5, 1])
    label = data.labels[j] if data is not None and data.labels[j] else (data.dominant[j] if data else "")
    name.markdown(f"**#{j}**")
    name.caption(label or "unlabelled")
    with controls_col:
        control_widgets(j, "steer", P - bundle.model.config.prototype_top_k)
    remove_col.button("Remove", key=f"steer_remove_{j}", on_click=_remove_row, args=(j,))

a, b = st.columns([1, 3])
a.number_input("Prototype id", 0, P - 1, step=1, key="steer_add_id")
b.button("Add a gain slider", key="steer_add", on_click=_add_row)

with st.expander("Find prototypes to steer: by text query or by contrast"):
    if loaded.index is None:
        st.info("Targeting needs the bundle's index.")
    else:
        query = st.text_input("Text query over neighbourhoods", key="steer_query", placeholder="e.g. thou thee thy")
        top = st.slider("How many", 1, 32, 8, key="steer_target_top")
        demos = sorted(BEHAVIOURS.glob("*.json")) if BEHAVIOURS.is_dir() else []
        if demos:
            demo = st.selectbox("Demo behaviour", demos, key="steer_demo_behaviour", format_func=lambda p: p.stem)
            if st.button("Fill the prompts from this behaviour", key="steer_fill"):
                try:
                    spec = core.load_behaviour(demo)
                except (OSError, BehaviourError) as err:
                    st.error(f"Cannot read {demo.name}: {err}")
                else:  # one prompt per line: a prompt's own line breaks become spaces
                    st.session_state["steer_behaviour"] = "\n".join(
                        " ".join(x.split()) for x in spec.contrast_behaviour or spec.prompts
                    )
                    st.session_state["steer_neutral"] = "\n".join(
                        " ".join(x.split()) for x in spec.contrast_neutral or spec.neutral_prompts
                    )
        behaviour = st.text_area("Prompts that show the behaviour (one per line)", key="steer_behaviour")
        neutral = st.text_area("Neutral prompts (one per line)", key="steer_neutral")
        q_col, c_col = st.columns(2)
        found = None
        try:
            if q_col.button("Target by query", key="steer_by_query") and query.strip():
                found = core.target_by_query(loaded.index, query, top, tokenizer=bundle.tokenizer)
            if c_col.button("Target by contrast", key="steer_by_contrast"):
                lines_b = [x for x in behaviour.splitlines() if x.strip()]
                lines_n = [x for x in neutral.splitlines() if x.strip()]
                with st.spinner("Running the prompts…"):
                    found = core.target_by_contrast(bundle, lines_b, lines_n, top, index=loaded.index)
        except (ValueError, ControlsError) as err:
            st.error(f"Cannot target: {err}")
        if found is not None:
            st.session_state["steer_targets"] = [int(t.id) for t in found]
            st.session_state["steer_target_rows"] = [
                {"prototype": int(t.id), "score": float(t.score), "evidence": str(t.evidence)} for t in found
            ]
        if st.session_state.get("steer_target_rows"):
            st.dataframe(st.session_state["steer_target_rows"], hide_index=True, key="steer_target_table")
            if st.button("Suppress all of these", key="steer_suppress_targets"):
                for j in st.session_state["steer_targets"]:
                    state.set_suppressed(j, True)
                st.rerun()

controls = state.session_controls(bundle.fingerprint)
try:
    controls.validate(P, bundle.model.config.prototype_top_k, bundle.fingerprint)
except ControlsError as err:
    st.error(f"These controls cannot be applied: {err}")
    st.stop()

st.divider()
key_args = (loaded.path, bundle.fingerprint, prompt, int(max_new), int(seed), bool(sample), float(temperature))
with st.spinner("Regenerating…"):
    try:
        original = generated(*key_args, json.dumps(Controls().to_json(), sort_keys=True))
        steered = generated(*key_args, json.dumps(controls.to_json(), sort_keys=True))
    except (ValueError, ControlsError) as err:
        st.error(f"Cannot generate: {err}")
        st.stop()
if original["notice"]:
    st.warning(original["notice"])
diff = core.compare_tokens(original["ids"], steered["ids"])
if controls.is_empty:
    st.caption("No controls in force: the steered text is the original.")
elif diff.first_difference is None:
    st.caption("The controls did not change any generated token.")
else:
    changed = len(diff.steered_unaligned)
    st.caption(
        f"First difference at token {diff.first_difference + 1}; {changed} of {len(steered['ids'])} "
        "steered tokens are not in the original (marked, after aligning the two texts)."
    )
left, right = st.columns(2)
with left:
    st.markdown("**Original**")
    st.html(token_html(original["tokens"], diff.original_unaligned))
    st.metric("Perplexity (original model)", f"{original['ppl_base']:.2f}")
with right:
    st.markdown("**Steered**")
    st.html(token_html(steered["tokens"], diff.steered_unaligned))
    m1, m2 = st.columns(2)
    m1.metric(
        "Perplexity (original model)",
        f"{steered['ppl_base']:.2f}",
        help="How natural the steered text is to the unsteered model",
    )
    m2.metric("Perplexity (under the controls)", f"{steered['ppl_own']:.2f}")
st.caption(
    f"Steered generation took {steered['seconds'] * 1000:.0f} ms for {len(steered['ids'])} tokens "
    "(cached results are instant)."
)

st.divider()
s1, s2 = st.columns(2)
s1.download_button(
    "Save controls (JSON)",
    json.dumps(controls.to_json(), indent=2),
    file_name="controls.json",
    mime="application/json",
    on_click="ignore",
    key="steer_save",
)
upload = s2.file_uploader("Load controls (JSON)", type=["json"], key="steer_upload")
if upload is not None and st.session_state.get("steer_uploaded") != upload.file_id:
    st.session_state["steer_uploaded"] = upload.file_id
    try:
        loaded_controls = Controls.from_json(json.loads(upload.getvalue().decode("utf-8")))
        loaded_controls.validate(P, bundle.model.config.prototype_top_k, bundle.fingerprint)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        st.error(f"{upload.name} is not a JSON controls file: {err}")
    except ControlsError as err:
        st.error(f"Cannot load {upload.name}: {err}")
    else:
        state.apply_controls(loaded_controls)
        st.rerun()
st.caption(f"Gains range 0 to {MAX_GAIN:g} here; a controls file may hold any non-negative gain.")
