"""Steer: the steered text beside the original with differing tokens marked, perplexities, live
regeneration with a fixed seed (prompt, settings and texts: a fragment that reruns alone); below,
the session's gains and suppressions (a searchable, sortable table that commits an edit in its
on_change, and sliders for the few prototypes the analyst pins), targeting, save/load."""

from __future__ import annotations

import json
import time

import pandas as pd
import streamlit as st

import core
from core import BehaviourError, Controls, ControlsError
from explorer import permalink, state
from explorer.cards import SUPPRESSION_WINS, control_widgets
from explorer.controls import ControlSet, apply_table, edited_table, plural, table_rows
from explorer.safe import md

DEFAULT_PROMPT = "KING."
BEHAVIOURS = state.REPO / "assets" / "behaviours"
MAX_CONTROLS_BYTES = 5_000_000  # a controls file of every prototype of a 16k model is well under this
TABLE_REFUSAL = "steer_table_refusal"  # (controls serial, reason): the table's last edit, refused
TABLE_TYPES = {"prototype": "int64", "label": "str", "gain": "float64", "suppressed": "bool", "note": "str"}


@st.cache_data(show_spinner=False, max_entries=128)
def generated(
    path: str,
    fingerprint: str,
    prompt: str,
    max_new_tokens: int,
    seed: int,
    settings_json: str,
    controls_json: str,
) -> dict:
    """One generation with its per-token strings and perplexities (cached per request)."""
    bundle = state.cached_bundle(path)
    controls = Controls.from_json(json.loads(controls_json))
    settings = core.GenerationSettings.from_json(json.loads(settings_json))
    t0 = time.perf_counter()
    result = core.generate_text(
        bundle,
        prompt,
        max_new_tokens=max_new_tokens,
        controls=controls,
        seed=seed,
        settings=settings,
    )
    seconds = time.perf_counter() - t0
    return {
        "computed_at": time.time(),
        "text": result.text,
        "ids": result.new_ids,
        "tokens": [bundle.tokenizer.decode([t]) for t in result.new_ids],
        "ppl_own": core.continuation_perplexity(bundle, result.prompt_ids, result.new_ids, controls),
        "ppl_base": core.continuation_perplexity(bundle, result.prompt_ids, result.new_ids, None),
        "notice": result.notice,
        "seconds": seconds,
    }


def generation_widgets(greedy_column, sample_column) -> core.GenerationSettings:
    """The generation settings' widgets and the settings they make. Defaults: core.DEFAULT_GENERATION
    (chosen by bench/generation.py); "Greedy" is plain greedy decoding. Their ranges are the
    permalink's, which checks a link's settings against them."""
    default = core.DEFAULT_GENERATION
    sampling = default if default.do_sample else core.GenerationSettings(do_sample=True)  # what Sample starts from
    greedy = greedy_column.toggle(
        "Greedy",
        False,
        key="steer_greedy",
        help="Plain greedy decoding: the likeliest token every time, no repetition penalty or n-gram ban",
    )
    sample = sample_column.toggle(
        "Sample",
        default.do_sample,
        key="steer_sample",
        disabled=greedy,
        help="Sample each token (the same seed on both sides), or take the likeliest",
    )
    t, p, r, n = st.columns(4)
    sampled = sample and not greedy
    temperature = t.slider(
        "Temperature",
        *permalink.TEMPERATURE,
        sampling.temperature,
        step=0.05,
        key="steer_temperature",
        disabled=not sampled,
    )
    top_p = p.slider(
        "Top-p",
        *permalink.TOP_P,
        sampling.top_p,
        step=0.05,
        key="steer_top_p",
        disabled=not sampled,
        help="Sample only from the likeliest tokens holding this probability mass",
    )
    penalty = r.slider(
        "Repetition penalty",
        *permalink.REPETITION_PENALTY,
        default.repetition_penalty,
        step=0.05,
        key="steer_repetition_penalty",
        disabled=greedy,
        help="Divide the logits of tokens already in the text by this (greedy or sampled); 1 is off",
    )
    ngram = n.number_input(
        "No-repeat n-gram",
        *permalink.NO_REPEAT_NGRAM,
        default.no_repeat_ngram_size,
        key="steer_no_repeat_ngram",
        disabled=greedy,
        help="Never repeat an n-gram of this many tokens of the text (greedy or sampled); 0 is off",
    )
    if greedy:
        return core.GREEDY
    return core.GenerationSettings(
        do_sample=bool(sample),
        temperature=round(float(temperature), 2) if sample else 1.0,
        top_p=round(float(top_p), 2) if sample else 1.0,
        repetition_penalty=round(float(penalty), 2),
        no_repeat_ngram_size=int(ngram),
    )


def token_html(tokens: list[str], different: frozenset[int]) -> str:
    """Escaped token spans, no space between them; the tokens at positions ``different`` get class diff."""
    spans = []
    for position, text in enumerate(tokens):
        differs = position in different
        spans.append(f'<span class="prism-tok{" diff" if differs else ""}">{state.escape(text)}</span>')
    return state.SNIPPET_CSS + '<div class="prism-snip">' + "".join(spans) + "</div>"


def timing(result: dict, run_started: float) -> str:
    """How long a generation took, and whether this run computed it or reused the cache."""
    took = f"{result['seconds'] * 1000:,.0f} ms for {plural(len(result['ids']), 'token')}"
    if result["computed_at"] >= run_started:
        return f"generated just now in {took}"
    when = time.strftime("%H:%M:%S", time.localtime(result["computed_at"]))
    return f"reused from the cache (generated at {when} in {took})"


def _pin() -> None:
    pinned = st.session_state.get(state.PINNED, [])
    j = int(st.session_state["steer_add_id"])
    if j not in pinned:
        st.session_state[state.PINNED] = [*pinned, j]


def _unpin(prototype: int) -> None:
    st.session_state[state.PINNED] = [j for j in st.session_state.get(state.PINNED, []) if j != prototype]


def _reset(prototypes: list[int], action: str) -> None:
    state.commit(state.current_controls().without(prototypes), action)


def _gains_to_one(prototypes: list[int]) -> None:
    value = state.current_controls()
    drop = set(prototypes)
    gains = {j: g for j, g in value.gains.items() if j not in drop}
    state.commit(ControlSet.of(gains, value.suppressed), f"gains of {plural(len(drop), 'prototype')} back to 1")


def _suppress_targets() -> None:
    targets = st.session_state.get("steer_targets", [])
    value = state.current_controls()
    for j in targets:
        value = value.with_suppressed(j, True)
    state.commit(value, f"suppressed {plural(len(targets), 'targeted prototype')}")


def _on_table_edit(key: str, serial: int, rows: list[dict], model: tuple[int, int, str]) -> None:
    """The table's on_change: commit its edit before the run, so that one run draws the new controls
    everywhere (the sidebar included); a refused edit stays in the table with the reason below it."""
    st.session_state.pop(TABLE_REFUSAL, None)
    if state.history().serial != serial:  # another widget's change in the same rerun came first
        st.session_state[TABLE_REFUSAL] = (state.history().serial, "the controls changed meanwhile: edit again")
        return
    P, K, fingerprint = model
    try:
        new = apply_table(
            state.current_controls(), [r["prototype"] for r in rows], edited_table(rows, st.session_state[key])
        )
        if len(new.suppressed) > P - K:
            raise ControlsError(f"at most {P - K} prototypes can be suppressed")
        new.to_core(fingerprint).validate(P, K, fingerprint)
    except ControlsError as err:
        st.session_state[TABLE_REFUSAL] = (serial, str(err))
    else:
        state.commit(new, "table edit")


@st.fragment
def regeneration(current: ControlSet, controls: Controls, problem: str | None) -> None:
    """Prompt, generation settings and the two texts with their perplexities. A change of the
    prompt or a setting reruns only this part, not the controls table; it holds no control widget,
    so the controls (``current``, as core ``controls``; ``problem`` when they cannot be applied)
    change only in a whole-app run, which draws the sidebar too."""
    prompt = st.text_area("Prompt", DEFAULT_PROMPT, key="steer_prompt", height=70)
    c1, c2, c3, c4 = st.columns(4)
    context = bundle.model.config.get_text_config().max_position_embeddings
    most = max(8, min(128, context // 2 // 8 * 8))
    max_new = c1.slider("Tokens", 8, most, min(64, most), step=8, key="steer_max_new")
    seed = c2.number_input("Seed", 0, 2**31 - 1, 0, key="steer_seed")
    settings = generation_widgets(c3, c4)

    page = {"bundle": loaded.name, "sprompt": prompt, "sn": int(max_new), "seed": int(seed)}
    permalink.write(page | permalink.encode_generation(settings), current)
    if problem is not None:
        st.error(f"These controls cannot be applied: {md(problem)}")
        return
    st.caption(f"Both texts {settings.describe(int(seed))}.")
    settings_json = json.dumps(settings.to_json(), sort_keys=True)
    key_args = (loaded.path, bundle.fingerprint, prompt, int(max_new), int(seed), settings_json)
    run_started = time.time()
    with st.spinner("Regenerating…"):
        try:
            original = generated(*key_args, json.dumps(Controls().to_json(), sort_keys=True))
            steered = generated(*key_args, json.dumps(controls.to_json(), sort_keys=True))
        except (ValueError, ControlsError) as err:
            st.error(f"Cannot generate: {md(err)}")
            return
    if original["notice"]:
        st.warning(md(original["notice"]))
    diff = core.compare_tokens(original["ids"], steered["ids"])
    if controls.is_empty:
        st.caption("No controls in force: the steered text is the original.")
    elif diff.first_difference is None:
        st.caption("The controls did not change any generated token.")
    else:
        changed = len(diff.steered_unaligned)
        st.caption(
            f"First difference at token {diff.first_difference + 1}; {changed:,} of "
            f"{plural(len(steered['ids']), 'steered token')} are not in the original (marked, after aligning "
            "the two texts)."
        )
    left, right = st.columns(2)
    with left:
        st.markdown("**Original** (the model as trained)")
        st.html(token_html(original["tokens"], diff.original_unaligned))
    with right:
        st.markdown("**Steered** (with the session's controls)")
        st.html(token_html(steered["tokens"], diff.steered_unaligned))
    st.markdown("**Perplexity of each text** (lower: more natural to the scoring model)")
    m1, m2, m3 = st.columns(3)
    m1.metric(
        "Original text, scored by the original model",
        f"{original['ppl_base']:.2f}",
        help="The unsteered continuation under the model as trained",
    )
    m2.metric(
        "Steered text, scored by the original model",
        f"{steered['ppl_base']:.2f}",
        help="How natural the steered text is to the unsteered model",
    )
    m3.metric(
        "Steered text, scored under the controls",
        f"{steered['ppl_own']:.2f}",
        help="The steered continuation under the model with the session's controls",
    )
    st.caption(f"Original: {timing(original, run_started)}. Steered: {timing(steered, run_started)}.")


def label_of(j: int) -> str:
    if data is None:
        return ""
    return data.labels[j] or data.dominant[j] or ""


loaded = state.load_current()
bundle = loaded.bundle
if not bundle.is_prism:
    st.info(f"{md(loaded.name)} is a dense twin: it has no prototypes to steer. Open a PRISM bundle in the sidebar.")
    st.stop()
P = bundle.model.config.num_prototypes
K = bundle.model.config.prototype_top_k
data = state.atlas_data(loaded) if loaded.index is not None else None
history = state.history()
current = history.present

st.subheader("Steer")
controls = current.to_core(bundle.fingerprint)
try:
    controls.validate(P, K, bundle.fingerprint)
    problem = None
except ControlsError as err:
    problem = str(err)
# The texts stay on top but are drawn last: the run of a control change (a table edit, a slider)
# shows the table and the controls first and regenerates after them, so that the browser draws
# the table while the server generates, and the last thing a run sends is the texts.
texts = st.container()
st.divider()
st.markdown("**Controls of this session** (from any page; every change regenerates; undo and redo in the sidebar)")
if current.is_empty:
    st.caption(
        "No controls yet: pin a prototype below for a gain slider, add rows to the table, or use the "
        "suppress toggle and gain slider of a prototype card on the Atlas or Trace page."
    )
else:
    st.caption(current.describe())
if current.conflicts:
    st.info(f"{plural(len(current.conflicts), 'prototype')} both suppressed and gained. {SUPPRESSION_WINS}")

pinned = [j for j in st.session_state.get(state.PINNED, []) if 0 <= j < P]
for j in pinned:
    name, controls_col, remove_col = st.columns([2, 5, 1])
    name.markdown(f"**#{j}**")
    name.caption(md(label_of(j), limit=80) or "unlabelled")
    with controls_col:
        control_widgets(j, "steer", P - K)
    remove_col.button("Unpin", key=f"steer_unpin_{j}", on_click=_unpin, args=(j,), help="Remove the slider row")

a, b = st.columns([1, 3])
a.number_input("Prototype id", 0, P - 1, step=1, key="steer_add_id")
b.button(
    "Add a gain slider",
    key="steer_add",
    on_click=_pin,
    help="Pin this prototype: a slider row here (its gain stays as it is until you move the slider)",
)

query = st.text_input(
    "Search the controls", key="steer_table_query", placeholder="prototype id or label text, e.g. 12 or thou"
)
rows = table_rows(current, {j: label_of(j) for j in current.ids})
needle = query.strip().lower().lstrip("#")
if needle:
    rows = [r for r in rows if needle == str(r["prototype"]) or needle in r["label"].lower()]
shown = [r["prototype"] for r in rows]
table_key = f"steer_table_{history.serial}"  # a fresh table after every change of the controls
st.data_editor(
    pd.DataFrame(rows, columns=list(TABLE_TYPES)).astype(TABLE_TYPES),
    key=table_key,
    on_change=_on_table_edit,
    args=(table_key, history.serial, rows, (P, K, bundle.fingerprint)),
    num_rows="dynamic",
    hide_index=True,
    width="stretch",
    height=min(420, 38 + 35 * max(len(rows), 1)),
    column_config={
        "prototype": st.column_config.NumberColumn("prototype", min_value=0, max_value=P - 1, step=1),
        "label": st.column_config.TextColumn("label", disabled=True),
        "gain": st.column_config.NumberColumn(
            "gain", min_value=0.0, format="plain", help="Its true value (1 = unchanged; 0 = slice switched off)"
        ),
        "suppressed": st.column_config.CheckboxColumn("suppressed", default=False),
        "note": st.column_config.TextColumn("note", disabled=True),
    },
)
st.caption(
    f"{plural(len(shown), 'row')} of {len(current.ids):,} · click a column header to sort · edit a gain or "
    "the suppressed box · delete a row to reset that prototype · add a row to control another"
)
refused = st.session_state.get(TABLE_REFUSAL)
if refused is not None and refused[0] == history.serial:
    st.error(f"That edit was not applied: {md(refused[1])}")
r1, r2 = st.columns(2)
r1.button(
    f"Reset the {plural(len(shown), 'prototype')} shown" if needle else "Reset all controls",
    key="steer_reset_shown",
    on_click=_reset,
    args=(shown, f"reset {plural(len(shown), 'prototype')}"),
    disabled=not shown,
)
gained_shown = [j for j in shown if current.gain(j) != 1.0]
r2.button(
    "Set the shown gains back to 1",
    key="steer_reset_gains",
    on_click=_gains_to_one,
    args=(gained_shown,),
    disabled=not gained_shown,
)

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
                    st.error(f"Cannot read {md(demo.name)}: {md(err)}")
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
            st.error(f"Cannot target: {md(err)}")
        if found is not None:
            st.session_state["steer_targets"] = [int(t.id) for t in found]
            st.session_state["steer_target_rows"] = [
                {"prototype": int(t.id), "score": float(t.score), "evidence": str(t.evidence)} for t in found
            ]
        if st.session_state.get("steer_target_rows"):
            st.dataframe(st.session_state["steer_target_rows"], hide_index=True, key="steer_target_table")
            st.button("Suppress all of these", key="steer_suppress_targets", on_click=_suppress_targets)

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
upload = s2.file_uploader(
    "Load controls (JSON)",
    type=["json"],
    key="steer_upload",
    help=f"A controls file saved here or by `prism`; at most {MAX_CONTROLS_BYTES // 1_000_000} MB",
    max_upload_size=MAX_CONTROLS_BYTES // 1_000_000,  # the box states the same limit as the help
)
if upload is not None and st.session_state.get("steer_uploaded") != upload.file_id:
    st.session_state["steer_uploaded"] = upload.file_id  # parsed once per file, not on every rerun
    name = md(upload.name, limit=80)
    try:
        if upload.size > MAX_CONTROLS_BYTES:
            raise ControlsError(f"it has {upload.size:,} bytes; at most {MAX_CONTROLS_BYTES:,} are read here")
        loaded_controls = Controls.from_json(json.loads(upload.getvalue().decode("utf-8")))
        loaded_controls.validate(P, K, bundle.fingerprint)
        value = ControlSet.from_core(loaded_controls)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        if isinstance(err, ControlsError):
            st.error(f"Cannot load {name}: {md(err)}")
        else:
            st.error(f"{name} is not a JSON controls file: {md(str(err)[:200])}")
    except (TypeError, AttributeError, KeyError):
        st.error(f"{name} is not a JSON controls file: it does not hold gains and suppressions")
    else:
        state.commit(value, f"loaded {upload.name}")
        st.rerun()
st.caption(
    "A gain is any number from 0 up to the library's limit, shown as it is: a pinned slider widens to show a "
    "gain above 3, and a loaded or calibrated gain keeps its value."
)
with texts:
    regeneration(current, controls, problem)
