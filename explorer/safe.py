"""The one way untrusted text reaches the screen (issue 15, item 6).

Every string that comes from the corpus, a bundle's files, an upload or the analyst's typing
passes through one of these before it is drawn:

- ``md`` for anything Streamlit renders as markdown: ``st.markdown``, ``st.caption``,
  ``st.metric``, alert boxes, widget labels and ``help`` tooltips. Streamlit markdown renders
  links, raw URLs, KaTeX (``$..$``), colour and icon directives (``:red[..]``,
  ``:material/..:``) and emphasis; a backslash before every ASCII punctuation character (what
  CommonMark defines as an escape) makes each of them literal text, and an invisible word joiner
  after ``:``, ``@`` and ``.`` stops the links and emoji found in the parsed text.
- ``html_text`` for ``st.html`` and for Plotly strings (legend names, hover text, axis
  labels): Plotly renders a subset of HTML (``<a href>``, ``<b>``, ``<br>``) in every text
  field, so ``<``, ``>``, ``&`` and quotes become entities.
- ``csv_cell`` / ``csv_frame`` for files the analyst downloads: a cell that a spreadsheet would
  read as a formula gets a leading apostrophe, as the report's CSV does.

``st.text``, ``st.code``, ``st.dataframe`` cells and selectbox options show text as text and
need none of these (escaping there would show the backslashes).
"""

from __future__ import annotations

import html
import re
import string

import pandas as pd

_PUNCTUATION = frozenset(string.punctuation)  # the ASCII punctuation CommonMark lets a backslash escape
# After parsing, Streamlit's markdown still turns URLs, www. names and e-mail addresses found in the
# text into links, and :shortcodes: into emoji; an invisible word joiner after these characters
# breaks those patterns without changing what is shown.
_BREAK_AFTER = frozenset(":@.")
_JOINER = "\u2060"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def md(text: object, limit: int | None = None) -> str:
    """``text`` as markdown that renders as exactly that text, on one line.

    Args:
        text: any value; ``str()`` of it is shown.
        limit: cut to this many characters first (an ellipsis marks the cut).
    """
    raw = str(text)
    if limit is not None and len(raw) > limit:
        raw = raw[: max(0, limit - 1)] + "\u2026"
    raw = _CONTROL.sub("", raw.replace("\r\n", " ").replace("\n", " ").replace("\r", " "))
    return "".join(("\\" + c + _JOINER if c in _BREAK_AFTER else "\\" + c) if c in _PUNCTUATION else c for c in raw)


def md_repr(text: object) -> str:
    """``repr(text)`` as literal markdown (how the app quotes a token or a query)."""
    return md(repr(str(text)))


def html_text(text: object) -> str:
    """``text`` with HTML's special characters as entities (for st.html and every Plotly string).

    A double quote becomes ``&#34;``, not ``&quot;``: Plotly decodes numeric entities but shows
    ``&quot;`` as it is (a label like “"” drew as “&quot;”).
    """
    return html.escape(str(text), quote=True).replace("&quot;", "&#34;")


def csv_cell(value: object) -> object:
    """A cell that spreadsheets will not evaluate: text starting like a formula gets a leading apostrophe."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_frame(frame: pd.DataFrame) -> str:
    """The frame as CSV text with every text cell (and header) guarded by :func:`csv_cell`."""
    guarded = frame.copy()
    for column in guarded.columns:
        if pd.api.types.is_object_dtype(guarded[column]) or pd.api.types.is_string_dtype(guarded[column]):
            guarded[column] = guarded[column].map(csv_cell)
    guarded.columns = [csv_cell(str(c)) for c in guarded.columns]
    return guarded.to_csv(index=False)
