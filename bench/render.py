"""Render the benches' results files into the tables of docs/benchmarks.md.

docs/benchmarks.md holds marker pairs; everything between a pair is generated, everything
outside is left alone:

    <!-- results:quality -->            table of bench/results/quality.json
    <!-- /results -->
    <!-- results:control.tasks -->      table of bench/results/control.tasks.json
    <!-- /results -->
    <!-- results:bundle -->             the demo bundle's own records (training.json, index/meta.json,
    <!-- /results -->                   the influence factors' header)
    <!-- results:summary -->            one line per results file: command, date, commit, and whether
    <!-- /results -->                   it was measured or transcribed

The tables themselves are drawn by bench/_tables.py. Each is followed by the command, date and
commit that produced it (and, for figures transcribed from an earlier README, that
provenance). The output depends only on the files, so rendering twice gives the same text.

    python bench/render.py            # rewrite docs/benchmarks.md
    python bench/render.py --check    # exit 1 if docs/benchmarks.md is out of date (for CI)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tables import NONE, RENDERERS, render_bundle, table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"

MARKER = re.compile(r"<!-- results:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /results -->", re.DOTALL)


def _short(commit: str) -> str:
    sha, dirty = commit.partition("+")[::2]
    return sha[:7] + (f"+{dirty}" if dirty else "")


def _machine(m: dict) -> str:
    parts = []
    if m.get("cpu_count"):
        parts.append(f"{m['cpu_count']} CPUs" + (f" ({m['cpu']})" if m.get("cpu") else ""))
    if m.get("torch"):
        parts.append(f"torch {m['torch']}")
    if m.get("device"):
        parts.append(m["device"])
    if m.get("load_average_1min") is not None:
        parts.append(f"load average {m['load_average_1min']} at the end")
    if m.get("description"):
        parts.append(m["description"])
    return ", ".join(parts)


def footer(name: str, record: dict) -> list[str]:
    date = record.get("date", "")
    when = date[:16].replace("T", " ") + " UTC" if date else NONE
    if record.get("provenance"):
        when = "committed " + when
    wall = record.get("wall_s") or record.get("figures", {}).get("wall_s")
    parts = [f"`{record['command']}`", when, f"commit `{_short(record.get('commit', 'unknown'))}`"]
    if record.get("machine"):
        parts.append(_machine(record["machine"]))
    if wall:
        parts.append(f"{wall:,.0f} s")
    parts.append(f"[`bench/results/{name}.json`](../bench/results/{name}.json)")
    lines = ["", "_" + " · ".join(parts) + "_"]
    if record.get("provenance"):
        lines += ["", f"_Not re-measured: {record['provenance']}._"]
    return lines


def render_summary() -> list[str]:
    rows, measured, transcribed = [], [], []
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        commit = f"`{_short(record.get('commit', 'unknown'))}`"
        if record.get("provenance"):
            how = "transcribed from the README at " + commit
            transcribed.append(f"`{path.stem}`")
        else:
            how = "measured at " + commit
            measured.append(f"`{path.stem}`")
        rows.append(
            [
                f"[`{path.name}`](../bench/results/{path.name})",
                f"`{record['command']}`",
                record.get("date", NONE)[:10],
                how,
            ]
        )
    lines = table(["results file", "command", "date", "figures"], rows, "llll")
    lines += [
        "",
        f"- Measured by the bench itself: {', '.join(measured) or 'none'}.",
        f"- Transcribed from an earlier commit's README (that session's bench output), not re-measured: "
        f"{', '.join(transcribed) or 'none'}.",
    ]
    return lines


def render_section(name: str) -> str:
    """The generated text between the markers of ``name``."""
    if name == "bundle":
        return "\n".join(render_bundle()) + "\n"
    if name == "summary":
        return "\n".join(render_summary()) + "\n"
    path = RESULTS / f"{name}.json"
    script = name.split(".", 1)[0]
    if not path.is_file():
        return f"_No results yet: `bench/results/{name}.json` does not exist (run `bench/{script}.py`)._\n"
    record = json.loads(path.read_text(encoding="utf-8"))
    renderer = RENDERERS.get(Path(record.get("script", script)).stem)
    if renderer is None:
        return f"_No renderer for `{record.get('script', script)}` in bench/render.py._\n"
    return "\n".join(renderer(record.get("figures", {})) + footer(name, record)) + "\n"


def render(text: str) -> str:
    """``text`` with every marked section regenerated."""

    def replace(match: re.Match) -> str:
        name = match["name"]
        return f"<!-- results:{name} -->\n{render_section(name)}<!-- /results -->"

    return MARKER.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the document is out of date; write nothing")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document to render (default: docs/benchmarks.md)")
    args = parser.parse_args(argv)
    text = args.doc.read_text(encoding="utf-8")
    if text.count("<!-- results:") != len(MARKER.findall(text)):
        print(f"{args.doc}: a <!-- results:NAME --> marker has no <!-- /results --> after it", file=sys.stderr)
        return 2
    names = {m["name"] for m in MARKER.finditer(text)}
    unused = sorted(p.stem for p in RESULTS.glob("*.json") if p.stem not in names)
    for stem in unused:
        print(
            f"note: bench/results/{stem}.json has no <!-- results:{stem} --> section in {args.doc.name}",
            file=sys.stderr,
        )
    rendered = render(text)
    if args.check:
        if rendered != text:
            stale = [m["name"] for m in MARKER.finditer(text) if m["body"] != render_section(m["name"])]
            print(f"{args.doc} is out of date ({', '.join(stale)}): run `python bench/render.py`", file=sys.stderr)
            return 1
        return 0
    if rendered != text:
        args.doc.write_text(rendered, encoding="utf-8")
        print(f"{args.doc.relative_to(REPO) if args.doc.is_relative_to(REPO) else args.doc} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
