"""Browser helpers of the benches that drive the explorer in headless Chromium (Playwright):
wait for the end of a Streamlit script run on every animation frame, watch the page's script
runs and key presses in the page's own clock, pin a Steer gain slider.

The functions take a Playwright ``page`` (``launch``: a started ``sync_playwright()``). Importing
this module does not import playwright: a bench asks ``has_browser`` first and runs without one.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

CHROMIUM = os.environ.get("PRISM_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


def idle(page) -> None:
    """Wait for the end of the script run in progress, checked on every animation frame.

    Playwright's own waits (``wait_for_selector``, ``locator.wait_for``) check again after 20,
    50, 100, 100 and then every 500 ms: a run that ended just after a check was seen up to
    0.5 s late, which the edit timings before this change included (1.197 s measured for a
    Steer table edit whose run ended 0.85 s after the key press).
    """
    time.sleep(0.05)
    page.wait_for_function(
        "() => document.querySelector('[data-testid=stApp]')?.dataset.testScriptState === 'notRunning'",
        polling="raf",
        timeout=300_000,
    )


def pin_slider(page, prototype: int) -> None:
    """Pin a gain slider for ``prototype`` on the Steer page and focus it."""
    page.get_by_label("Prototype id").fill(str(prototype))
    page.get_by_label("Prototype id").press("Enter")
    idle(page)
    page.get_by_role("button", name="Add a gain slider").click()
    idle(page)
    slider = page.get_by_role("slider", name="Gain").last
    slider.focus()


def wait_for_run(page) -> None:
    """Wait for the rerun a widget change has just triggered to start (if not over already) and end."""
    try:
        page.wait_for_selector("[data-testid='stApp'][data-test-script-state='running']", timeout=5_000)
    except Exception:  # noqa: BLE001 - the run may already be over
        pass
    idle(page)


# Watches Streamlit's script state: window.__prismRuns gets [state, performance.now()] on each change.
# One observer per app element: another call only empties the list.
RUN_WATCH = """() => {
  const app = document.querySelector('[data-testid=stApp]');
  window.__prismRuns = [];
  if (window.__prismWatched === app) return;
  window.__prismWatched = app;
  new MutationObserver(() => window.__prismRuns.push([app.dataset.testScriptState, performance.now()]))
    .observe(app, {attributes: true, attributeFilter: ['data-test-script-state']});
}"""

# The page's clock at the analyst's Enter key (before the grid's editor takes it).
KEY_WATCH = """() => {
  window.__prismEnter = null;
  if (window.__prismKeys) return;
  window.__prismKeys = true;
  document.addEventListener('keydown', e => {
    if (e.key === 'Enter' && window.__prismEnter === null) window.__prismEnter = performance.now();
  }, {capture: true});
}"""


def edit_phases(page) -> tuple[float, float] | None:
    """In the page's clock, seconds from the Enter key (KEY_WATCH) to the start of the run it
    caused and to the end of that run (RUN_WATCH); None when the page saw no complete run."""
    enter = page.evaluate("() => window.__prismEnter")
    runs, ends = _run_ends(page)
    if enter is None or not ends:
        return None
    start, end = runs[ends[-1] - 1][1], runs[ends[-1]][1]
    return round((start - enter) / 1000, 3), round((end - enter) / 1000, 3)


def _run_ends(page) -> tuple[list, list[int]]:
    """The script-state changes the page saw since RUN_WATCH, and where its runs ended (running -> notRunning)."""
    runs = page.evaluate("() => window.__prismRuns || []")
    return runs, [i for i, (s, _) in enumerate(runs) if s == "notRunning" and i > 0 and runs[i - 1][0] == "running"]


def script_run(page) -> float | None:
    """Seconds of the last complete script run the page saw, if any."""
    runs, ends = _run_ends(page)
    return round((runs[ends[-1]][1] - runs[ends[-1] - 1][1]) / 1000, 3) if ends else None


def script_runs(page) -> int:
    """How many script runs the page saw complete since RUN_WATCH."""
    return len(_run_ends(page)[1])


def has_browser() -> bool:
    """Whether Chromium and the playwright package are here."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).is_file()


def launch(playwright):
    """Headless Chromium (Debian's, software WebGL) from a started ``sync_playwright()``."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM, args=["--use-gl=swiftshader", "--enable-unsafe-swiftshader"]
    )
