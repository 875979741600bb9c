"""Results files of the benches: each run's figures, with what produced them.

Every bench script ends by calling :func:`emit` with its flat figures. ``emit`` writes
``bench/results/<script>.json`` (``<script>.<tag>.json`` with ``--results-tag TAG``, for a
second configuration of the same script) and then prints the figures as the script's last
line, one JSON object, as before. The file holds::

    {"script", "command", "argv", "date", "commit", "machine", "wall_s", "figures"}

``command`` is the run as a shell command from the repository root, ``argv`` the exact
``sys.argv``, ``date`` the UTC time of the write, ``commit`` ``git rev-parse HEAD`` with
"+dirty" when tracked files differ from it (results files and docs excepted), ``machine`` the
platform, CPU, torch version and device, and ``wall_s`` the seconds since the script imported
this module. ``python bench/render.py`` turns the files into the tables of docs/benchmarks.md.

The file is written to a temporary name and renamed, so an interrupted bench leaves the
previous results whole. ``--no-results`` (smoke runs) writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
# Paths whose changes do not make a run's code differ from its commit: the benches' own output.
NOT_CODE = ("bench/results", "docs")

_STARTED = time.monotonic()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --results-tag and --no-results to a bench's parser."""
    parser.add_argument(
        "--results-tag",
        default=None,
        metavar="TAG",
        help="write bench/results/<script>.TAG.json instead of <script>.json",
    )
    parser.add_argument("--no-results", action="store_true", help="do not write a results file (smoke runs)")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def commit() -> str:
    """HEAD's sha, with "+dirty" when tracked code differs from it; "unknown" outside git."""
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return "unknown"
    status = _git(
        "status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){path}" for path in NOT_CODE)
    )
    return sha + ("+dirty" if status else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(device: str = "cpu") -> dict:
    """Platform, CPU, Python and torch versions, torch threads and the device of this run."""
    info = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "device": device,
    }
    if "torch" in sys.modules or device != "cpu":
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            info["device"] = f"{device} ({torch.cuda.get_device_name()})"
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def command(argv: list[str]) -> str:
    """``argv`` as a shell command run from the repository root."""
    script = Path(argv[0])
    if script.is_absolute() and script.is_relative_to(REPO):
        script = script.relative_to(REPO)
    return shlex.join(["python", str(script), *argv[1:]])


def results_path(script: str | Path, tag: str | None = None) -> Path:
    """bench/results/<script>.json, or <script>.<tag>.json."""
    name = Path(script).stem + (f".{tag}" if tag else "")
    return RESULTS / f"{name}.json"


def write(figures: dict, script: str | Path, tag: str | None = None, device: str = "cpu") -> Path:
    """Write one run's results file atomically; return its path."""
    record = {
        "script": f"bench/{Path(script).name}",
        "command": command(sys.argv),
        "argv": list(sys.argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(device),
        "wall_s": round(time.monotonic() - _STARTED, 1),
        "figures": figures,
    }
    path = results_path(script, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def emit(figures: dict, args: argparse.Namespace, script: str | Path, device: str = "cpu") -> None:
    """Write the results file (unless --no-results), then print ``figures`` as the last line."""
    if not getattr(args, "no_results", False):
        path = write(figures, script, getattr(args, "results_tag", None), device)
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        print(f"results written to {shown}", file=sys.stderr, flush=True)
    print(json.dumps(figures), flush=True)
