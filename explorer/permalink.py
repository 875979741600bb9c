"""Permalinks (issue 17, item 5): the page's address carries the view, so that a reload or the
link opened in another browser shows the same thing.

Each page writes its state into ``st.query_params`` on every run; the first run of a session
reads them back (``restore``) before any widget is drawn. The address holds the bundle by the
name the app shows (never a server path), the Trace request (prompt, completion mode, pasted
completion, length, method, examples per token), the chosen token, the open card, the Atlas
selection, the Steer settings (prompt, length, seed and generation settings: ``greedy=1``, or those
of ``sample``, ``temp``, ``topp``, ``rep``, ``ngram`` that differ from core's default) and the
controls: inline (``g=12:0.5,40:2``, ``s=3,9``) for up to ``INLINE_CONTROLS`` prototypes, else as
``ctl=<hash>`` of a copy kept by this server process (``CONTROLS_KEPT`` of them; a link to a
forgotten copy says so). Generation settings or controls that the page cannot take (malformed,
out of a widget's range) are left out with a notice; another such value is left out silently.

Opening a link is an action of the analyst: its controls are committed to the session's
history (Undo takes them back) and the Trace page traces the prompt once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Mapping

import streamlit as st

from core import DEFAULT_GENERATION, GREEDY, ControlsError, GenerationSettings

from . import state
from .controls import ControlSet

INLINE_CONTROLS = 40  # prototypes written into the address itself; more go to the server-side copy
CONTROLS_KEPT = 2000  # server-side copies of large control sets (the oldest is forgotten first)
MAX_PICKED = 500  # Atlas selections longer than this are not written into the address
RESTORED = "_permalink_restored"
PENDING_CONTROLS = "_permalink_controls"
AFTER_LOAD = "_permalink_after_load"
NOTICE = "_permalink_notice"
# The Steer page's generation widgets, (lowest, highest): the page draws them with these ranges and a
# link's values are checked against them (a widget given a value out of its range would raise).
TEMPERATURE = (0.1, 2.0)
TOP_P = (0.05, 1.0)
REPETITION_PENALTY = (1.0, 2.0)
NO_REPEAT_NGRAM = (0, 10)
GENERATION_PARAMS = ("greedy", "sample", "temp", "topp", "rep", "ngram")


@st.cache_resource(show_spinner=False)
def _kept() -> OrderedDict:
    """hash -> controls JSON of the large control sets linked to from this process (shared, bounded)."""
    return OrderedDict()


def encode_controls(value: ControlSet) -> dict[str, str]:
    """The query parameters that carry ``value`` (empty for no controls)."""
    if value.is_empty:
        return {}
    if len(value.ids) <= INLINE_CONTROLS:
        params = {}
        if value.gain_items:
            params["g"] = ",".join(f"{j}:{g!r}" for j, g in value.gain_items)
        if value.suppressed:
            params["s"] = ",".join(str(j) for j in sorted(value.suppressed))
        return params
    document = json.dumps({"gains": value.gains, "suppressed": sorted(value.suppressed)}, sort_keys=True)
    key = hashlib.sha256(document.encode()).hexdigest()[:20]
    kept = _kept()
    kept[key] = document
    kept.move_to_end(key)
    while len(kept) > CONTROLS_KEPT:
        kept.popitem(last=False)
    return {"ctl": key}


def decode_controls(params: Mapping[str, str]) -> ControlSet | None:
    """The controls the parameters carry, None when they carry none.

    Raises:
        ControlsError: a malformed value, or a ``ctl`` copy this server no longer keeps.
    """
    if "ctl" in params:
        document = _kept().get(str(params["ctl"]))
        if document is None:
            raise ControlsError(
                "the link's controls were kept by a server process that has since restarted; "
                "load them from a saved controls file on the Steer page"
            )
        data = json.loads(document)
        return ControlSet.of({int(k): v for k, v in data["gains"].items()}, data["suppressed"])
    if "g" not in params and "s" not in params:
        return None
    gains = {}
    try:
        for item in filter(None, str(params.get("g", "")).split(",")):
            j, _, g = item.partition(":")
            gains[int(j)] = float(g)
        suppressed = [int(j) for j in filter(None, str(params.get("s", "")).split(","))]
    except ValueError:
        raise ControlsError("the link's controls are not of the form g=ID:GAIN,... s=ID,...") from None
    return ControlSet.of(gains, suppressed)


def _sampling() -> GenerationSettings:
    """What sampling starts from: the default settings if they sample, else sampling's own defaults."""
    return DEFAULT_GENERATION if DEFAULT_GENERATION.do_sample else GenerationSettings(do_sample=True)


def encode_generation(settings: GenerationSettings) -> dict[str, str]:
    """The query parameters that carry ``settings``: ``greedy=1`` for plain greedy decoding, else
    those of ``sample``, ``temp``, ``topp``, ``rep`` and ``ngram`` that differ from
    :data:`core.DEFAULT_GENERATION` (none for the default itself)."""
    default = DEFAULT_GENERATION
    if settings == default:
        return {}
    if settings == GREEDY:
        return {"greedy": "1"}
    params = {}
    if settings.do_sample != default.do_sample:
        params["sample"] = str(int(settings.do_sample))
    if settings.do_sample:
        sampling = _sampling()
        if settings.temperature != sampling.temperature:
            params["temp"] = repr(settings.temperature)
        if settings.top_p != sampling.top_p:
            params["topp"] = repr(settings.top_p)
    if settings.repetition_penalty != default.repetition_penalty:
        params["rep"] = repr(settings.repetition_penalty)
    if settings.no_repeat_ngram_size != default.no_repeat_ngram_size:
        params["ngram"] = str(settings.no_repeat_ngram_size)
    return params


def _number(params: Mapping[str, str], name: str, bounds: tuple[float, float], default: float) -> float:
    """The float ``params[name]`` (``default`` when absent), in ``bounds``."""
    if name not in params:
        return default
    low, high = bounds
    try:
        value = float(params[name])
    except (TypeError, ValueError):
        value = math.nan
    if not low <= value <= high:  # nan fails too
        raise ValueError(f"{name}={params[name]!r} is not a number from {low:g} to {high:g}")
    return value


def decode_generation(params: Mapping[str, str]) -> GenerationSettings | None:
    """The generation settings the parameters carry (see :func:`encode_generation`), None when they
    carry none; the parameters they leave out take :data:`core.DEFAULT_GENERATION`'s values.

    Raises:
        ValueError: a malformed value, one outside the Steer widget's range, or ``temp``/``topp``
            without sampling.
    """
    if not any(name in params for name in GENERATION_PARAMS):
        return None
    if "greedy" in params:
        if str(params["greedy"]) != "1":
            raise ValueError(f"greedy={params['greedy']!r}: greedy=1 is plain greedy decoding")
        return GREEDY
    default = DEFAULT_GENERATION
    sample = default.do_sample
    if "sample" in params:
        if str(params["sample"]) not in ("0", "1"):
            raise ValueError(f"sample={params['sample']!r} is not 0 or 1")
        sample = str(params["sample"]) == "1"
    if not sample and ("temp" in params or "topp" in params):
        raise ValueError("temp and topp apply only when sampling (sample=1)")
    low, high = NO_REPEAT_NGRAM
    ngram = default.no_repeat_ngram_size
    if "ngram" in params:
        try:
            ngram = int(params["ngram"])
        except (TypeError, ValueError):
            ngram = -1
        if not low <= ngram <= high:
            raise ValueError(f"ngram={params['ngram']!r} is not a whole number from {low} to {high}")
    sampling = _sampling()
    return GenerationSettings(
        do_sample=sample,
        temperature=_number(params, "temp", TEMPERATURE, sampling.temperature) if sample else 1.0,
        top_p=_number(params, "topp", TOP_P, sampling.top_p) if sample else 1.0,
        repetition_penalty=_number(params, "rep", REPETITION_PENALTY, default.repetition_penalty),
        no_repeat_ngram_size=ngram,
    )


def steer_generation_state(settings: GenerationSettings) -> dict[str, object]:
    """The Steer page's generation widgets' values (by key) that make ``settings``."""
    if settings == GREEDY:
        return {"steer_greedy": True}
    values: dict[str, object] = {
        "steer_greedy": False,
        "steer_sample": settings.do_sample,
        "steer_repetition_penalty": settings.repetition_penalty,
        "steer_no_repeat_ngram": settings.no_repeat_ngram_size,
    }
    if settings.do_sample:
        values |= {"steer_temperature": settings.temperature, "steer_top_p": settings.top_p}
    return values


def _notify(text: str) -> None:
    """Add ``text`` to the notice shown once the bundle is loaded (one notice may hold several)."""
    before = st.session_state.get(NOTICE)
    st.session_state[NOTICE] = f"{before} {text}" if before else text


def _int(params: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    try:
        value = int(params[name])
    except (KeyError, ValueError):
        return None
    return value if low <= value <= high else None


def restore() -> None:
    """On a session's first run, take the view from the address (before any widget is drawn)."""
    if st.session_state.get(RESTORED):
        return
    st.session_state[RESTORED] = True
    params = {k: st.query_params.get(k) for k in st.query_params}
    if not params:
        return
    s = st.session_state
    if params.get("bundle"):
        s[state.BUNDLE_PATH] = str(params["bundle"])
    # Trace
    if params.get("prompt") is not None:
        s["trace_prompt"] = str(params["prompt"])
        s["trace_autorun"] = True
    if params.get("mode") in ("generate", "score my own"):
        s["trace_mode"] = params["mode"]
    if params.get("completion") is not None:
        s["trace_completion"] = str(params["completion"])
    for name, key, low, high in (("n", "trace_max_new", 1, 64), ("top", "trace_top", 1, 50)):
        value = _int(params, name, low, high)
        if value is not None:
            s[key] = value
    if params.get("method"):
        s["_permalink_method"] = str(params["method"])  # checked against the choices on the Trace page
    token = _int(params, "token", 0, 100_000)
    if token is not None:
        s["trace_token_wanted"] = token
    after: dict[str, object] = {}  # set once the bundle is loaded (opening a bundle forgets picks and cards)
    card = _int(params, "card", 0, 10_000_000)
    if card is not None:
        after[state.CARD] = card
    # Atlas
    if params.get("picked"):
        try:
            after[state.PICKED] = sorted({int(j) for j in str(params["picked"]).split(",") if j})[:MAX_PICKED]
        except ValueError:
            pass
    atlas_card = _int(params, "acard", 0, 10_000_000)
    if atlas_card is not None:
        after["atlas_card"] = atlas_card
    if params.get("colour") in ("category", "source"):
        s["atlas_colour"] = params["colour"]
    if params.get("q"):
        s["atlas_query"] = str(params["q"])
    # Steer
    if params.get("sprompt") is not None:
        s["steer_prompt"] = str(params["sprompt"])
    for name, key, low, high in (("sn", "steer_max_new", 8, 128), ("seed", "steer_seed", 0, 2**31 - 1)):
        value = _int(params, name, low, high)
        if value is not None:
            s[key] = value
    try:
        settings = decode_generation(params)
    except ValueError as err:  # ArgumentError (a setting core refuses) is one too
        _notify(f"The link's generation settings were not applied: {err}.")
    else:
        if settings is not None:
            s.update(steer_generation_state(settings))
    try:
        after[PENDING_CONTROLS] = decode_controls(params)
    except (ControlsError, ValueError) as err:
        _notify(f"The link's controls were not applied: {err}")
    s[AFTER_LOAD] = after


def after_load(loaded: state.Loaded) -> None:
    """Apply what the link holds for the loaded bundle: picks, cards and controls (once per session)."""
    after = st.session_state.pop(AFTER_LOAD, None) or {}
    value = after.pop(PENDING_CONTROLS, None)
    for key, item in after.items():
        st.session_state[key] = item
    if value is not None:
        cfg = loaded.bundle.model.config
        try:
            value.to_core(loaded.bundle.fingerprint).validate(
                cfg.num_prototypes, cfg.prototype_top_k, loaded.bundle.fingerprint
            )
        except ControlsError as err:
            _notify(f"The link's controls were not applied: {err}")
        else:
            state.commit(value, "opened a permalink")
    notice = st.session_state.pop(NOTICE, None)
    if notice:
        from .safe import md

        st.warning(md(notice))


def write(page: dict[str, object], controls: ControlSet | None = None) -> None:
    """Make the address carry this page's view: ``page``'s parameters and ``controls``."""
    params = {k: str(v) for k, v in page.items() if v is not None and v != ""}
    if controls is not None:
        params |= encode_controls(controls)
    current = {k: st.query_params.get(k) for k in st.query_params}
    if current != params:
        st.query_params.from_dict(params)
