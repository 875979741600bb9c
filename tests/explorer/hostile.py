"""A hostile-input corpus for the explorer (issue 15, item 7): strings that Streamlit markdown,
Plotly or a spreadsheet would render as something other than text, and files built to exhaust a
parser. ``hostile_bundle`` (conftest.py) indexes and labels a tiny bundle on documents made of
them, with source names made of them, so they reach every page as corpus text, labels,
categories, legend names and card metrics.

``RAW_MARKERS`` are fragments that appear only when a hostile string reaches the screen
unescaped: a markdown string, a Plotly text field or an HTML body holding one of them would render
a link, a colour, math, or markup.
"""

from __future__ import annotations

import json

LINK = "[click me](https://evil.example/md)"
HTML_LINK = '<a href="https://evil.example/html" target="_blank">open me</a>'
BOLD = "<b>HOSTILEBOLD</b>"
SCRIPT = "<script>alert('hostile')</script>"
KATEX = "$x^2+y^2$ and $$\\int_0^1 f$$"
COLOUR = ":red[HOSTILERED] :material/home: :blue-background[bg]"
BARE_URL = "https://evil.example/bare www.evil.example"
FORMULA = "=cmd|' /C calc'!A0"
FORMULAS = (FORMULA, "+1+1", "-2+3", "@SUM(A1)")
HUGE = "1e308 " + "9" * 400

HOSTILE = (LINK, HTML_LINK, BOLD, SCRIPT, KATEX, COLOUR, BARE_URL, FORMULA, HUGE)

# corpus sources (they become dominant sources, legend names, and labels' categories)
SOURCES = (f"{FORMULA} {LINK}", f"{HTML_LINK} {COLOUR}")

RAW_MARKERS = (
    "](https://evil",
    "https://evil",
    "www.evil",
    "<a href",
    "<b>HOSTILE",
    "<script",
    ":red[",
    ":material/home",
    "$x^2",
    "$$\\int",
    ":blue-background[",
)

HTML_MARKERS = ("<a href", "<b>HOSTILE", "<script")  # in st.html bodies and Plotly strings (no autolinks there)


def documents(count: int) -> list[dict]:
    """``count`` corpus rows made of the hostile strings, alternating between the hostile sources."""
    rows = []
    for i in range(count):
        text = f"Hostile note {i}: " + " | ".join(HOSTILE[(i + k) % len(HOSTILE)] for k in range(4)) + f" end {i}."
        rows.append({"id": f"hostile-{i}-{LINK}", "source": SOURCES[i % len(SOURCES)], "text": text})
    return rows


def deep_json(depth: int = 200_000) -> bytes:
    """A JSON document nested ``depth`` arrays deep (Python's json raises RecursionError on it)."""
    return ("[" * depth + "]" * depth).encode()


def huge_number_task() -> bytes:
    """A task JSONL whose answer is a 5,000-digit integer (json refuses to convert it)."""
    row = {"prompt": SCRIPT, "choices": [LINK, COLOUR]}
    return (json.dumps(row)[:-1] + ', "answer": ' + "9" * 5000 + "}\n").encode() * 3


def unescaped(text: str, markers: tuple[str, ...] = RAW_MARKERS) -> list[str]:
    """The raw markers in ``text`` (not right after a backslash): what would render as markup, not text."""
    found = []
    for marker in markers:
        start = text.find(marker)
        while start >= 0:
            if start == 0 or text[start - 1] != "\\":
                found.append(marker)
                break
            start = text.find(marker, start + 1)
    return found
