"""What the Report page downloads: the file name and the report object (pure functions, tested)."""

from __future__ import annotations

import re
import time

import core
from core import Attribution, Controls


def file_stem(prompt: str, when: time.struct_time) -> str:
    """``prism-report-<first words of the prompt>-<UTC time>``: distinct names for distinct traces."""
    words = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()[:40].strip("-") or "trace"
    return f"prism-report-{words}-{time.strftime('%Y%m%d-%H%M%S', when)}"


def report_for_download(result: Attribution, controls: Controls | None, bundle_name: str, tokens: list[int]) -> dict:
    """The report of the current trace, with the bundle named as the app names it (never its
    path on the server) and only the ``tokens`` chosen (all when none)."""
    report = core.report_from_attributions([result], controls)
    report["model"] = bundle_name
    for trace in report["traces"]:
        trace["model"] = bundle_name
        if tokens:
            trace["tokens"] = [t for t in trace["tokens"] if t["position"] in set(tokens)]
    return report
