"""Attribution reports: one or more traced completions with their slices, training examples,
the controls in force and the model fingerprint, as JSON, CSV or a self-contained HTML page.

The HTML report needs nothing but a browser: its charts are inline SVG (no script, no CDN),
every string from the corpus, a prompt or a file is HTML-escaped, and the JSON report is
embedded in it (``<script type="application/json" id="prism-report-data">``) so that the
page carries its own data.

JSON layout (``format`` "prism-report", ``version`` 1)::

    {"format", "version", "created", "model", "model_fingerprint", "method",
     "controls": {controls JSON}, "generation": {settings JSON and "seed"} or null,
     "traces": [one `prism attribute --json` object per prompt]}

``generation`` is how :func:`build_report` generates the completions a prompts file does not
give (:meth:`~core.generation.GenerationSettings.to_json` plus ``seed``, as each generated
trace records its own); null for a report of attributions computed elsewhere.

CSV layout: long format, one row per (token, prototype slice) with ``kind`` "slice" and one
row per (token, ranked example) with ``kind`` "example"; text cells that a spreadsheet would
read as a formula (starting with = + - @) get a leading apostrophe.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from core import store
from core.attribution.engine import attribute
from core.attribution.records import Attribution
from core.bundle import Bundle
from core.control.controls import Controls
from core.errors import ArgumentError, ReportError
from core.generation import DEFAULT_GENERATION, GenerationSettings, describe_generation
from core.index.format import PrototypeIndex

REPORT_FORMAT = "prism-report"
REPORT_VERSION = 1
FORMATS = ("html", "json", "csv")
CSV_COLUMNS = (
    "trace",
    "kind",
    "position",
    "token",
    "token_id",
    "logit",
    "probability",
    "rank",
    "prototype",
    "weight",
    "slice",
    "label",
    "doc_id",
    "source",
    "score",
    "relative",
    "snippet",
    "highlight_start",
    "highlight_end",
)
MAX_PROMPTS = 1000
WATERFALL_SLICES = 10  # strongest slices drawn in a token's waterfall; the rest are summed into one step


def read_prompts(path: str | Path) -> list[dict]:
    """Read the prompts to report on.

    A ``.jsonl`` file holds one object per line, ``{"prompt": ..., "completion": ...}`` (the
    completion is optional: without one the model generates it); any other file holds one
    prompt per line (blank lines skipped).

    Raises:
        ReportError: a missing, unreadable, malformed or empty file.
    """
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"prompts file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ReportError(f"prompts file {p} is not UTF-8 text ({err})") from None
    items: list[dict] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            row = store.parse_json(
                line, f"{p}:{number}", 'each line is {"prompt": ..., "completion": ...}', error=ReportError
            )
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise ReportError(f'{p}:{number} needs a non-empty "prompt" string')
            completion = row.get("completion")
            if completion is not None and not isinstance(completion, str):
                raise ReportError(f'{p}:{number}: "completion" must be a string')
            items.append({"prompt": row["prompt"], "completion": completion})
        else:
            items.append({"prompt": line, "completion": None})
    if not items:
        raise ReportError(f'prompts file {p} has no prompts (one per line, or JSONL rows with a "prompt")')
    if len(items) > MAX_PROMPTS:
        raise ReportError(f"prompts file {p} has {len(items)} prompts; split it into files of at most {MAX_PROMPTS}")
    return items


def report_from_attributions(
    attributions: list[Attribution],
    controls: Controls | None = None,
    created: str | None = None,
    generation: dict | None = None,
) -> dict:
    """The report object for already computed attributions (all of one model).

    Args:
        generation: how missing completions were generated (settings JSON plus ``seed``), if known.
    """
    if not attributions:
        raise ReportError("a report needs at least one trace")
    first = attributions[0]
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
        "model": first.model,
        "model_fingerprint": first.model_fingerprint,
        "method": first.method,
        "controls": (controls or Controls(model_fingerprint=first.model_fingerprint)).to_json(),
        "generation": generation,
        "traces": [a.to_json() for a in attributions],
    }


def build_report(
    bundle: Bundle,
    index: PrototypeIndex,
    items: list[dict],
    *,
    controls: Controls | None = None,
    method: Literal["auto", "neighbourhood", "influence", "spans"] = "auto",
    top: int = 10,
    max_new_tokens: int = 16,
    generation: GenerationSettings | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Trace every ``{"prompt", "completion"}`` item and collect the report object.

    Args:
        generation: how an item without a completion has it generated (None:
            :data:`core.generation.DEFAULT_GENERATION`; :data:`core.generation.GREEDY`: plain greedy).
        seed: the sampling seed of those generations (each item's generation starts from it).
        progress: called as ``progress(done, total)`` after each item.

    Raises:
        ArgumentError: ``generation`` that is not a :class:`~core.generation.GenerationSettings`.
    """
    settings = DEFAULT_GENERATION if generation is None else generation
    if not isinstance(settings, GenerationSettings):
        raise ArgumentError(f"generation must be a GenerationSettings, got {type(settings).__name__}")
    results = []
    for done, item in enumerate(items, start=1):
        results.append(
            attribute(
                bundle,
                index,
                item["prompt"],
                item.get("completion"),
                top=top,
                method=method,
                controls=controls,
                max_new_tokens=max_new_tokens,
                generation=settings,
                seed=seed,
            )
        )
        if progress is not None:
            progress(done, len(items))
    if controls is not None and not controls.model_fingerprint:
        controls = Controls(controls.gains, controls.suppressed, bundle.fingerprint, controls.note)
    return report_from_attributions(results, controls, generation={**settings.to_json(), "seed": seed})


def to_json(report: dict) -> str:
    """The report as indented JSON text."""
    return json.dumps(report, indent=2, ensure_ascii=False)


def _cell(value: object) -> object:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_csv(report: dict) -> str:
    """The report as long-format CSV (see the module docstring)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for number, trace in enumerate(report["traces"]):
        for token in trace["tokens"]:
            base = {
                "trace": number,
                "position": token["position"],
                "token": token["token"],
                "token_id": token["token_id"],
                "logit": token["logit"],
                "probability": token["probability"],
            }
            for rank, p in enumerate(token["prototypes"], start=1):
                row = {
                    **base,
                    "kind": "slice",
                    "rank": rank,
                    "prototype": p["id"],
                    "weight": p["weight"],
                    "slice": p["slice"],
                    "label": p.get("label") or "",
                }
                writer.writerow({k: _cell(v) for k, v in row.items()})
            for rank, e in enumerate(token.get("examples", []), start=1):
                row = {
                    **base,
                    "kind": "example",
                    "rank": rank,
                    "prototype": e["prototype"],
                    "doc_id": e["doc_id"],
                    "source": e["source"],
                    "score": e["score"],
                    "relative": e.get("relative"),
                    "snippet": e["snippet"],
                    "highlight_start": e["highlight_start"],
                    "highlight_end": e["highlight_end"],
                }
                writer.writerow({k: _cell(v) for k, v in row.items()})
    return buffer.getvalue()


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def highlighted_snippet(snippet: str, start: int, end: int, escape: Callable[[str], str] | None = None) -> str:
    """HTML for a snippet with its trigger token ``snippet[start:end]`` in <mark>; every part
    through ``escape`` (default: html.escape). An empty span (an example with no marked token,
    as from a sketch-only influence store) marks nothing."""
    escape = escape or _esc
    start = max(0, min(int(start), len(snippet)))
    end = max(start, min(int(end), len(snippet)))
    if start == end:
        return escape(snippet)
    return f"{escape(snippet[:start])}<mark>{escape(snippet[start:end])}</mark>{escape(snippet[end:])}"


def waterfall_svg(
    token: dict, labels: dict[int, str] | None = None, width: int = 640, shown: int = WATERFALL_SLICES
) -> str:
    """An inline SVG waterfall: the token's strongest slices, the rest, and the logit they sum to."""
    labels = labels or {}
    prototypes = sorted(token["prototypes"], key=lambda p: -abs(p["slice"]))
    steps = []
    for p in prototypes[:shown]:
        label = labels.get(p["id"]) or p.get("label") or ""
        steps.append((f"#{p['id']} {label[:24]}".strip(), p["slice"], label or None))  # as the app labels its bars
    rest = sum(p["slice"] for p in prototypes[shown:])
    others = len(prototypes) - shown
    if others > 0:  # counted as the app's waterfall counts them
        steps.append((f"{others} other" + ("" if others == 1 else "s"), rest, None))
    cumulative = [0.0]
    for _, value, _ in steps:
        cumulative.append(cumulative[-1] + value)
    total = token["logit"]
    low, high = min([*cumulative, total, 0.0]), max([*cumulative, total, 0.0])
    span = (high - low) or 1.0
    left, right, row = 230, 70, 20
    plot = width - left - right
    height = row * (len(steps) + 1) + 24

    def x(value: float) -> float:
        return left + (value - low) / span * plot

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="slices of token {_esc(token["token"])} summing to its logit">'
    ]
    parts.append(f'<line x1="{x(0):.1f}" y1="0" x2="{x(0):.1f}" y2="{height - 20}" stroke="#888" stroke-width="1"/>')
    for i, (name, value, label) in enumerate(steps):
        a, b = sorted((x(cumulative[i]), x(cumulative[i + 1])))
        y = i * row + 2
        colour = "#0072B2" if value >= 0 else "#D55E00"
        sign = "+" if value >= 0 else "\u2212"
        title = f"{name}: {value:+.4f}" + (f" ({label})" if label else "")
        parts.append(
            f'<g><title>{_esc(title)}</title><rect x="{a:.1f}" y="{y}" width="{max(b - a, 1):.1f}" '
            f'height="{row - 6}" fill="{colour}"/></g>'
        )
        parts.append(f'<text x="{left - 6}" y="{y + row - 9}" text-anchor="end" font-size="11">{_esc(name)}</text>')
        parts.append(f'<text x="{width - right + 4}" y="{y + row - 9}" font-size="11">{sign}{abs(value):.3f}</text>')
    y = len(steps) * row + 2
    a, b = sorted((x(0), x(total)))
    parts.append(f'<rect x="{a:.1f}" y="{y}" width="{max(b - a, 1):.1f}" height="{row - 6}" fill="#444"/>')
    parts.append(
        f'<text x="{left - 6}" y="{y + row - 9}" text-anchor="end" font-size="11" font-weight="bold">logit</text>'
    )
    parts.append(
        f'<text x="{width - right + 4}" y="{y + row - 9}" font-size="11" font-weight="bold">{total:.3f}</text>'
    )
    parts.append(
        f'<text x="{left}" y="{height - 4}" font-size="10" fill="#666">'
        f'{low:.2f}</text><text x="{width - right}" y="{height - 4}" font-size="10" fill="#666" '
        f'text-anchor="end">{high:.2f}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:72rem;color:#222;
line-height:1.4;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}h3{font-size:1rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.2rem .5rem;
text-align:left;vertical-align:top}th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.tok{display:inline-block;border:1px solid #ccc;border-radius:4px;padding:0 .25rem;margin:1px;font-family:monospace;
white-space:pre}.snippet{font-family:monospace;white-space:pre-wrap;font-size:.8rem}
mark{background:#E69F00;color:#000}.meta{color:#555;font-size:.85rem}pre{background:#f6f6f6;padding:.5rem;
overflow:auto}.check{color:#006d4e;font-weight:bold}summary h3{display:inline}
nav a.tok{text-decoration:none;color:inherit}
"""


def _token_strip(trace: dict) -> str:
    chips = []
    for t in trace["tokens"]:
        alpha = 0.15 + 0.85 * max(0.0, min(1.0, t["probability"]))
        chips.append(
            f'<span class="tok" style="background:rgba(0,114,178,{alpha * 0.5:.2f})" '
            f'title="token {t["position"] + 1}: p={t["probability"]:.3f}">{_esc(t["token"])}</span>'
        )
    return "".join(chips)


def _examples_table(examples: list[dict]) -> str:
    """Ranked training examples as an HTML table; every corpus string escaped."""
    rows = "".join(
        f'<tr><td class="num">{rank}</td><td class="num">{e["score"]:.4f}</td><td>{_esc(e["doc_id"])}</td>'
        f'<td>{_esc(e["source"])}</td><td class="num">{e["prototype"] if e["prototype"] >= 0 else "–"}</td>'
        '<td class="snippet">'
        f"{highlighted_snippet(e['snippet'], e['highlight_start'], e['highlight_end'])}</td></tr>"
        for rank, e in enumerate(examples, start=1)
    )
    return (
        f"<table><tr><th>#</th><th>score</th><th>document</th><th>source</th><th>prototype</th>"
        f"<th>snippet</th></tr>{rows}</table>"
    )


def _contents(report: dict) -> str:
    """A contents list: each trace, and each of its tokens, linked to its section."""
    items = []
    for number, trace in enumerate(report["traces"]):
        tokens = "".join(
            f'<a class="tok" href="#t{number + 1}-{t["position"] + 1}">{_esc(t["token"])}</a>' for t in trace["tokens"]
        )
        items.append(
            f'<li><a href="#t{number + 1}">Trace {number + 1}</a>: {_esc(trace["prompt"][:80])} '
            f"({len(trace['tokens'])} tokens)<br>{tokens}</li>"
        )
    return f"<nav><h2>Contents</h2><ol>{''.join(items)}</ol></nav>"


def _grouped_table(token: dict) -> str:
    """The token's slices summed by category (the part of each label before ": "), strongest first:
    exact sums of exact slices, as the app's grouped waterfall shows them."""
    groups: dict[str, list[float]] = {}
    for p in token["prototypes"]:
        category = (p.get("label") or "").split(": ", 1)[0] or "unlabelled"
        groups.setdefault(category, []).append(p["slice"])
    rows = "".join(
        f'<tr><td>{_esc(name)}</td><td class="num">{len(values)}</td><td class="num">{sum(values):+.4f}</td></tr>'
        for name, values in sorted(groups.items(), key=lambda kv: -abs(sum(kv[1])))
    )
    return (
        "<details><summary>Slices by category</summary><table><tr><th>category</th><th>prototypes</th>"
        f"<th>sum of slices</th></tr>{rows}</table></details>"
    )


def _trace_html(number: int, trace: dict, examples_per_token: int) -> str:
    how = f" ({_esc(describe_generation(trace.get('generation')))})" if trace.get("generated") else ""
    out = [
        f'<h2 id="t{number + 1}">Trace {number + 1}</h2>',
        f"<p><b>Prompt</b></p><pre>{_esc(trace['prompt'])}</pre>",
        f"<p><b>Completion</b>{how}</p><pre>{_esc(trace['completion'])}</pre>",
        f"<p>Tokens: {_token_strip(trace)}</p>",
    ]
    for t in trace["tokens"]:
        total = sum(p["slice"] for p in t["prototypes"])
        err = abs(total - t["logit"])
        # one folded section per token (the first open): a long completion stays a short page
        out.append(
            f'<details id="t{number + 1}-{t["position"] + 1}"{" open" if t["position"] == 0 else ""}><summary>'
            f"<h3>Token {t['position'] + 1} / {len(trace['tokens'])}: "
            f'<span class="tok">{_esc(t["token"])}</span> logit {t["logit"]:.4f}, '
            f"probability {t['probability']:.4f}</h3></summary>"
        )
        out.append(f'<p class="check">\u03a3 slices = {total:.4f} = logit (|error| = {err:.1e})</p>')
        out.append(waterfall_svg(t))
        out.append(_grouped_table(t))
        rows = "".join(
            f'<tr><td class="num">{p["id"]}</td><td>{_esc(p.get("label") or "")}</td>'
            f'<td class="num">{p["weight"]:.4f}</td><td class="num">{p["slice"]:+.4f}</td></tr>'
            for p in t["prototypes"]
        )
        out.append(f"<table><tr><th>prototype</th><th>label</th><th>weight</th><th>slice</th></tr>{rows}</table>")
        if t.get("alternatives"):
            alts = "".join(
                f'<tr><td><span class="tok">{_esc(a["token"])}</span></td><td class="num">{a["logit"]:.4f}</td>'
                f'<td class="num">{a["probability"]:.4f}</td></tr>'
                for a in t["alternatives"]
            )
            out.append(
                f"<details><summary>Alternatives</summary><table><tr><th>token</th><th>logit</th>"
                f"<th>probability</th></tr>{alts}</table></details>"
            )
        examples = t.get("examples", [])[:examples_per_token]
        if examples:
            out.append(
                f"<details open><summary>Training examples behind this token</summary>"
                f"{_examples_table(examples)}</details>"
            )
        out.append("</details>")
    ranked = trace.get("examples", [])
    if ranked:
        out.append(f"<h3>Training examples over the whole completion</h3>{_examples_table(ranked)}")
    return "".join(out)


def to_html(report: dict, examples_per_token: int = 5) -> str:
    """A self-contained HTML page: inline CSS and SVG charts, no scripts to run, no network."""
    data = json.dumps(report, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
    controls = report.get("controls") or {}
    generation = ""
    if report.get("generation"):
        generation = f"; completions not given {_esc(describe_generation(report['generation']))}"
    body = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>PRISM attribution report: {_esc(report['model_fingerprint'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>PRISM attribution report</h1>",
        f'<p class="meta">Model <code>{_esc(report["model"])}</code>, fingerprint '
        f"<code>{_esc(report['model_fingerprint'])}</code>; attribution method {_esc(report['method'])}; "
        f"created {_esc(report['created'])}; {len(report['traces'])} trace(s){generation}.</p>",
        _contents(report),
        "<h2>Controls in force</h2>",
        f"<pre>{_esc(json.dumps(controls, indent=2))}</pre>" if controls else "<p>none</p>",
    ]
    body += [_trace_html(i, t, examples_per_token) for i, t in enumerate(report["traces"])]
    body.append(f'<script type="application/json" id="prism-report-data">{data}</script>')
    body.append("</body></html>")
    return "\n".join(body)


def render(report: dict, fmt: Literal["html", "json", "csv"]) -> str:
    """The report in one of :data:`FORMATS`."""
    if fmt == "html":
        return to_html(report)
    if fmt == "json":
        return to_json(report)
    if fmt == "csv":
        return to_csv(report)
    raise ReportError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")


def format_of(path: str | Path) -> str:
    """The format named by a file's extension, or ReportError naming the choices."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ReportError(f"cannot tell the report format of {path}: end the name with .html, .json or .csv")
    return suffix


def write_report(report: dict, path: str | Path) -> Path:
    """Write the report in the format its extension names, atomically (temp name, then rename)."""
    p = Path(path)
    text = render(report, format_of(p))  # type: ignore[arg-type]
    if not p.parent.is_dir():
        raise ReportError(f"folder {p.parent} does not exist; create it or choose another --out")
    return store.atomic_write(p, text)
