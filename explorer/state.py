"""What every page shares: the cached bundle and index, per-session controls, and small helpers.

The model and index are loaded once per process with ``st.cache_resource`` and never
modified; everything that belongs to one analyst (controls, the current trace, selections)
lives in ``st.session_state`` and reaches core as per-call arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

import core
from core import AtlasTables, Bundle, BundleError, Controls, PrototypeIndex, PrototypeIndexError
from core.report import highlighted_snippet

from .controls import ControlHistory, ControlSet
from .safe import html_text, md

REPO = Path(__file__).resolve().parent.parent
DEMO_BUNDLE = REPO / "assets" / "models" / "demo"
MODEL_ENV = "PRISM_EXPLORER_MODEL"
BUNDLES_ENV = "PRISM_EXPLORER_BUNDLES"  # folders (os.pathsep-separated) whose bundles the app may open

# session_state keys (one place, so that pages and tests agree)
BUNDLE_PATH = "bundle_path"
CONTROLS = "controls"  # ControlHistory: the session's controls, the only place they live
CONTROLS_FOR = "controls_fingerprint"  # the model the session's controls belong to
PINNED = "steer_pinned"  # list[int] prototypes that have a slider row on Steer (not a control)
TRACE = "trace"  # core.Attribution of the Trace page
TRACE_CONTROLS = "trace_controls"  # Controls in force when the trace was computed
PICKED = "atlas_picked"  # list[int] prototypes picked on the atlas
CARD = "card_prototype"  # prototype whose card the Trace page shows
DRAWN = "controls_drawn"  # serial of the controls the last whole-app run drew (the sidebar's)


def default_bundle_path() -> str:
    """``--model DIR`` after ``streamlit run explorer/app.py --``, else $PRISM_EXPLORER_MODEL, else the demo."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--model")
    try:
        args, _ = parser.parse_known_args(sys.argv[1:])
    except (argparse.ArgumentError, SystemExit):
        args = argparse.Namespace(model=None)
    return args.model or os.environ.get(MODEL_ENV) or str(DEMO_BUNDLE)


def runtime_settings() -> tuple[str, str]:
    """(device, dtype) the server runs models with: ``--device`` and ``--dtype`` after
    ``streamlit run explorer/app.py --``, else $PRISM_DEVICE and $PRISM_DTYPE, else ``auto``."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    try:
        args, _ = parser.parse_known_args(sys.argv[1:])
    except (argparse.ArgumentError, SystemExit):
        args = argparse.Namespace(device=None, dtype=None)
    return args.device or core.default_device(), args.dtype or core.default_dtype()


def bundle_roots() -> list[Path]:
    """The folders whose bundles this server may open: $PRISM_EXPLORER_BUNDLES, else the demo's folder."""
    configured = [Path(p).expanduser() for p in os.environ.get(BUNDLES_ENV, "").split(os.pathsep) if p.strip()]
    return [p.resolve() for p in configured or [DEMO_BUNDLE.parent]]


def shown_bundle_path(path: str) -> str:
    """How the sidebar shows a bundle: relative to the first root that holds it, else as given."""
    resolved = Path(path).expanduser().resolve()
    for root in bundle_roots():
        if resolved.is_relative_to(root) and resolved != root:
            return resolved.relative_to(root).as_posix()
    return path


def allowed_bundle(text: str) -> Path | None:
    """The bundle folder that ``text`` names, if this server may open it, else None.

    Allowed: the bundle the server was started with, and folders under ``bundle_roots()``; a
    relative name is looked up under each root in turn. Links and ``..`` are resolved before the
    check. None both for a folder outside the roots and for one that does not exist, so that
    the answer tells a visitor nothing about the server's files.
    """
    text = str(text).strip()
    if not text or "\x00" in text:
        return None
    start = Path(default_bundle_path()).expanduser().resolve()
    roots = bundle_roots()
    given = Path(text).expanduser()
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if resolved == start or any(resolved.is_relative_to(root) for root in roots):
            if resolved.is_dir():
                return resolved
    return None


def bundle_refusal(text: str) -> str:
    """The one message for a bundle folder that does not exist or may not be opened."""
    return (
        f"Cannot open bundle {md(repr(str(text)))}: there is no bundle of that name that this server offers. "
        f"Give a folder under the server's bundle folders (set by {BUNDLES_ENV}), e.g. its name."
    )


# Two caches: the server's own bundle (one entry, never evicted by what visitors open) and the
# others (a few entries shared by all sessions). One session opening four other bundles used to
# evict the demo model for everyone (issue 15, item 6).
OTHER_BUNDLES_CACHED = 2


def is_default_bundle(path: str) -> bool:
    """Whether ``path`` is the bundle this server was started with."""
    return Path(path).expanduser().resolve() == Path(default_bundle_path()).expanduser().resolve()


@st.cache_resource(show_spinner=False, max_entries=1)
def _default_bundle(path: str, device: str, dtype: str) -> Bundle:
    return core.load_bundle(path, device=device, dtype=dtype)


@st.cache_resource(show_spinner=False, max_entries=OTHER_BUNDLES_CACHED)
def _other_bundle(path: str, device: str, dtype: str) -> Bundle:
    return core.load_bundle(path, device=device, dtype=dtype)


@st.cache_resource(show_spinner=False, max_entries=1)
def _default_index(path: str, fingerprint: str) -> PrototypeIndex:
    return core.load_index(path)


@st.cache_resource(show_spinner=False, max_entries=OTHER_BUNDLES_CACHED)
def _other_index(path: str, fingerprint: str) -> PrototypeIndex:
    return core.load_index(path)


def cached_bundle(path: str) -> Bundle:
    """The bundle at ``path``, loaded once per process (shared by every session, read-only) on the
    server's device and dtype (:func:`runtime_settings`; an unknown value or a missing GPU is the
    ArgumentError that :func:`load_current` shows)."""
    load = _default_bundle if is_default_bundle(path) else _other_bundle
    return load(path, *runtime_settings())


def cached_index(path: str, fingerprint: str) -> PrototypeIndex:
    """The index of the bundle at ``path`` (``fingerprint`` keys the cache to its weights)."""
    return _default_index(path, fingerprint) if is_default_bundle(path) else _other_index(path, fingerprint)


@dataclass
class Loaded:
    """The bundle this session is looking at and its index (None when it has none)."""

    bundle: Bundle
    index: PrototypeIndex | None
    index_error: str | None = None

    @property
    def path(self) -> str:
        return str(self.bundle.path)

    @property
    def name(self) -> str:
        """How the app names the bundle to visitors (relative to the bundle folders, never a server path)."""
        return shown_bundle_path(self.path)


def load_current() -> Loaded:
    """The session's bundle and index, loaded with a progress bar the first time.

    Stops the page with st.error when the folder is not an allowed, usable bundle.
    """
    text = str(st.session_state.get(BUNDLE_PATH) or default_bundle_path())
    folder = allowed_bundle(text)
    if folder is None:
        st.error(bundle_refusal(text))
        st.stop()
    path = str(folder)
    seen = st.session_state.setdefault("_loaded_paths", set())
    bar = None if path in seen else st.progress(0, text=f"Loading model {md(text)}…")
    try:
        bundle = cached_bundle(path)
    except (BundleError, OSError, ValueError) as err:
        if bar is not None:
            bar.empty()
        st.error(f"Cannot open bundle {md(repr(text))}: {md(err)}")
        st.stop()
    if bar is not None:
        bar.progress(60, text="Loading prototype index…")
    index, problem = None, None
    if bundle.is_prism:
        try:
            index = cached_index(path, bundle.fingerprint)
        except (PrototypeIndexError, OSError, ValueError) as err:
            problem = str(err).replace(path, shown_bundle_path(path))  # no server paths on screen
    else:
        problem = f"{text} is a dense twin: it has no prototypes to explore"  # shown through md()
    if bar is not None:
        bar.empty()
    seen.add(path)
    if st.session_state.get(CONTROLS_FOR) != bundle.fingerprint:  # another model: old controls do not apply
        reset_session(bundle.fingerprint)
    return Loaded(bundle, index, problem)


def reset_session(fingerprint: str) -> None:
    """Forget controls (and their history), trace and picks: they belonged to another model."""
    st.session_state[CONTROLS] = ControlHistory(serial=history().serial + 1)  # serials are never reused
    st.session_state[CONTROLS_FOR] = fingerprint
    for key in (TRACE, TRACE_CONTROLS, PICKED, CARD, PINNED):
        st.session_state.pop(key, None)


def require_prism(loaded: Loaded) -> None:
    """End the page with an explanation unless the bundle is PRISM with an index."""
    if not loaded.bundle.is_prism:
        st.info(f"{md(loaded.name)} is a dense twin: it has no prototypes. Open a PRISM bundle in the sidebar.")
        st.stop()
    if loaded.index is None:
        st.info(f"This page needs the bundle's prototype index. {md(loaded.index_error)}")
        st.stop()


def history() -> ControlHistory:
    """The session's controls with their undo/redo history."""
    value = st.session_state.get(CONTROLS)
    return value if isinstance(value, ControlHistory) else ControlHistory()


def current_controls() -> ControlSet:
    """The controls in force for this session (every page and the sidebar render from this)."""
    return history().present


def session_controls(fingerprint: str) -> Controls:
    """The controls of this session as a core Controls (a fresh copy each call)."""
    return current_controls().to_core(fingerprint)


def commit(value: ControlSet, action: str) -> None:
    """Make ``value`` the session's controls: called only for an explicit action of the analyst.

    Call it from a widget callback (it runs before the page, so the sidebar and every page
    draw the new value), or follow it with st.rerun().
    """
    st.session_state[CONTROLS] = history().commit(value, action)


def undo() -> None:
    st.session_state[CONTROLS] = history().undo()


def redo() -> None:
    st.session_state[CONTROLS] = history().redo()


def drew_controls() -> None:
    """Record that this whole-app run draws the present controls (the router calls it with the sidebar)."""
    st.session_state[DRAWN] = history().serial


def rerun_app_if_controls_changed() -> None:
    """The first line of a fragment that holds control widgets: when a widget in it has just changed
    the controls (its callback ran before this fragment rerun), rerun the whole app instead, so
    that the sidebar and every page show the controls applied."""
    if history().serial != st.session_state.get(DRAWN):
        st.rerun(scope="app")


def sync_widget(key: str, value: object) -> None:
    """Give a keyed widget the session's value before it is drawn (never the reverse).

    A widget that was not drawn in some run can come back with the value the server kept for
    it or with its element default; writing the controls' value here, with the same value as
    the widget's ``value=``, makes both the server and the browser show the controls.
    """
    if st.session_state.get(key) != value:
        st.session_state[key] = value


def escape(text: str) -> str:
    """HTML-escape text from the corpus, a prompt or a file (see explorer/safe.py)."""
    return html_text(text)


def marked_snippet(snippet: str, start: int, end: int) -> str:
    """Escaped HTML of a snippet with the trigger token in <mark> (nothing marked for an empty span)."""
    return highlighted_snippet(snippet, start, end, escape)


def visible_token(token: str) -> str:
    """A token as a short markdown label: spaces and newlines shown, every markdown character escaped."""
    return md(token.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205")


def unique_labels(labels: list[str]) -> list[str]:
    """Make repeated labels distinct with invisible zero-width spaces (widgets match options by label)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        count = seen.get(label, 0)
        seen[label] = count + 1
        out.append(label + "\u200b" * count)
    return out


SNIPPET_CSS = (
    "<style>.prism-snip{font-family:monospace;font-size:.82rem;white-space:pre-wrap;padding:.25rem .5rem;"
    "border-left:3px solid #0072B2;margin:.2rem 0;background:rgba(127,127,127,.06)}"
    ".prism-snip mark{background:#E69F00;color:#000;padding:0 1px}"
    ".prism-tok{font-family:monospace;white-space:pre;padding:0;margin:0}"  # no gap inside words
    ".prism-tok.diff{background:#E69F00;color:#000}</style>"
)


@st.cache_resource(show_spinner=False, max_entries=1)
def _default_atlas(path: str, fingerprint: str, _bundle: Bundle, _index: PrototypeIndex) -> AtlasTables:
    return core.build_atlas_tables(_bundle, _index)


@st.cache_resource(show_spinner=False, max_entries=OTHER_BUNDLES_CACHED)
def _other_atlas(path: str, fingerprint: str, _bundle: Bundle, _index: PrototypeIndex) -> AtlasTables:
    return core.build_atlas_tables(_bundle, _index)


def atlas_data(loaded: Loaded) -> AtlasTables:
    """The per-prototype tables of the loaded bundle (computed once per process, read-only)."""
    assert loaded.index is not None
    build = _default_atlas if is_default_bundle(loaded.path) else _other_atlas
    return build(loaded.path, loaded.bundle.fingerprint, loaded.bundle, loaded.index)


def dark_theme() -> bool:
    """Whether the analyst's page is dark (the theme follows the browser's light/dark setting)."""
    theme = getattr(getattr(st, "context", None), "theme", None)
    return getattr(theme, "type", None) == "dark"


def max_suppressed(loaded: Loaded) -> int:
    cfg = loaded.bundle.model.config
    return cfg.num_prototypes - cfg.prototype_top_k
