"""The Compare page's two texts side by side, as pure functions (tested directly): the token
spans with the differing tokens marked, and the per-token table of both sides."""

from __future__ import annotations

from core import Decomposition

from . import state

ENDED = "(text ended)"  # the token cell of a side whose text is shorter than the other's


def token_spans(dec: Decomposition, other: Decomposition) -> str:
    """The completion as escaped token spans; tokens that differ from ``other`` at the same position marked."""
    spans = []
    for t in dec.tokens:
        same = t.position < len(other.tokens) and other.tokens[t.position].token == t.token
        spans.append(f'<span class="prism-tok{"" if same else " diff"}">{state.escape(t.token)}</span>')
    return state.SNIPPET_CSS + '<div class="prism-snip">' + "".join(spans) + "</div>"


def token_rows(names: tuple[str, str], left: Decomposition, right: Decomposition) -> list[dict]:
    """One row per position of the longer text: each side's token and its probability.

    Where one text has ended, its token cell says so and its probability cell is empty (the
    probabilities are text, three decimals, so that an empty cell shows as empty, not "None").
    """
    rows = []
    for position in range(max(len(left.tokens), len(right.tokens))):
        row: dict[str, object] = {"token": position + 1}
        for name, dec in zip(names, (left, right), strict=True):
            token = dec.tokens[position] if position < len(dec.tokens) else None
            row[f"{name}: token"] = ENDED if token is None else repr(token.token)
            row[f"{name}: probability"] = "" if token is None else f"{token.probability:.3f}"
        rows.append(row)
    return rows


def differing_positions(left: Decomposition, right: Decomposition) -> list[int]:
    """Positions (0-based) where the two texts have different tokens, or only one has a token."""
    longest = max(len(left.tokens), len(right.tokens))
    a, b = ([t.token for t in d.tokens] + [None] * (longest - len(d.tokens)) for d in (left, right))
    return [i for i in range(longest) if a[i] != b[i]]
