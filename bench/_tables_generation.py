"""The table of bench/generation.py's results (split from _tables.py to keep that file short)."""

from __future__ import annotations


def _fmt(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:,.{decimals}f}"


def _pm(row: dict, key: str, decimals: int) -> str:
    se = row.get(f"{key}_se")
    return _fmt(row.get(key), decimals) + ("" if se is None else f" ± {_fmt(se, decimals)}")


def render_generation(f: dict) -> list[str]:
    """bench/generation.py: one row per decoding setting, the corpus's own text first."""
    header = ["setting", "distinct-1", "distinct-2", "distinct-3", "repeated 4-grams", "twin perplexity", "distance"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    rows = [("corpus continuations (reference)", f.get("reference", {}), None)]
    rows += [(s["label"], s, s.get("distance")) for s in f.get("settings", [])]
    for label, row, distance in rows:
        chosen = " (default)" if label == f.get("chosen_label") else ""
        cells = [
            f"{label}{chosen}",
            _pm(row, "distinct_1", 3),
            _pm(row, "distinct_2", 3),
            _pm(row, "distinct_3", 3),
            _pm(row, "repeated_4", 3),
            _pm(row, "twin_ppl", 1),
            _fmt(distance, 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"{f.get('prompts')} prompts of {f.get('prompt_tokens')} tokens, {f.get('new_tokens')} new tokens each, "
        f"seed {f.get('seed')}; mean ± standard error over prompts. Model `{f.get('model')}`, twin "
        f"`{f.get('twin')}`. Rule: {f.get('rule')}.",
    ]
    return lines
