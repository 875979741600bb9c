"""End to end in a real browser: Playwright drives Debian's headless Chromium against
`streamlit run explorer/app.py` on the demo bundle, on a free local port.

Open the atlas, lasso prototypes and see their cards; trace a prompt and click a token; move a
gain slider on Steer and see the steered text change; export the HTML report and read it.
Screenshots of every page go to tests/artifacts/ (docs/screenshots/ holds reviewed copies).
Skips with the reason when Chromium or the playwright package is missing (`apt-get install
chromium`; `pip install playwright`: its own browser download is not needed)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.browser


CHROMIUM = os.environ.get("PRISM_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


DEMO = REPO / "assets" / "models" / "demo"


ARTIFACTS = REPO / "tests" / "artifacts"


STEER_PROMPT = "KING."  # the Steer page's default prompt


TIMEOUT_MS = 120_000  # generous: a 2-core CI machine shared with other jobs, software WebGL


playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """`streamlit run explorer/app.py` on a free port; yields its URL; stopped afterwards."""
    port = free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "streamlit-server.log", "w")  # noqa: SIM115
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(REPO / "explorer" / "app.py"),
        "--server.headless=true",
        "--server.address=127.0.0.1",
        f"--server.port={port}",
        "--server.fileWatcherType=none",
        "--browser.gatherUsageStats=false",
        "--",
        "--model",
        str(DEMO),
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        if process.poll() is not None:
            pytest.fail(f"streamlit exited with status {process.returncode}")
    else:
        process.terminate()
        pytest.fail("streamlit did not answer on its health endpoint within 90 s")
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def page(server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--use-gl=swiftshader", "--enable-unsafe-swiftshader"]
        )
        context = browser.new_context(viewport={"width": 1400, "height": 1300}, accept_downloads=True)
        context.set_default_timeout(TIMEOUT_MS)
        yield context.new_page()
        browser.close()


def nav(page, title: str) -> None:
    page.get_by_test_id("stTopNavLink").filter(has_text=title).click()
    page.get_by_role("heading", name=title).wait_for()


def idle(page) -> None:
    """Wait until the app has finished its script run (Streamlit marks the state on stApp)."""
    time.sleep(0.3)  # a rerun that has just been triggered may not have started yet
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=TIMEOUT_MS)


def shot(page, name: str, top=None) -> None:
    """Screenshot to tests/artifacts/NAME.png, with the ``top`` locator scrolled to the top."""
    if top is not None:
        top.evaluate("""e => {
            e.scrollIntoView({block: 'start'});
            let p = e.parentElement;  // the app scrolls inside a container, under a fixed top bar
            while (p && !(p.scrollHeight > p.clientHeight && getComputedStyle(p).overflowY !== 'visible')) {
                p = p.parentElement;
            }
            (p || document.scrollingElement).scrollBy(0, -90);
        }""")
    time.sleep(0.5)  # let the charts finish their transitions
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def gain_shown(page) -> float:
    """The value the (one) Gain slider on screen shows on its thumb."""
    slider = page.get_by_test_id("stSlider").filter(has=page.get_by_role("slider", name="Gain"))
    return float(slider.get_by_test_id("stSliderThumbValue").inner_text())


def steering_target() -> int:
    """A prototype whose gain 0 changes the Steer page's default greedy text (checked in core)."""
    from core import Controls, decompose, generate_text, load_bundle

    bundle = load_bundle(DEMO)
    original = generate_text(bundle, STEER_PROMPT, max_new_tokens=64).text
    first = decompose(bundle, prompt=STEER_PROMPT, max_new_tokens=1).tokens[0]
    for p in first.prototypes[:5]:
        steered = generate_text(bundle, STEER_PROMPT, max_new_tokens=64, controls=Controls(gains={p.id: 0.0}))
        if steered.text != original:
            return p.id
    pytest.fail("no single prototype of the first token changes the demo text when switched off")


def test_atlas_trace_steer_report(page, server, tmp_path):
    target = steering_target()

    # Atlas: the map draws; a lasso around the middle opens prototype cards
    page.goto(server)
    page.get_by_test_id("stPlotlyChart").wait_for()
    drag = page.locator(".js-plotly-plot .nsewdrag").first
    drag.wait_for()
    idle(page)
    shot(page, "atlas")
    box = drag.bounding_box()
    cx, cy, w, h = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["width"], box["height"]
    dx, dy = w / 14, h / 14
    corners = [(cx - dx, cy - dy), (cx + dx, cy - dy), (cx + dx, cy + dy), (cx - dx, cy + dy)]
    page.mouse.move(*corners[0])
    page.mouse.down()
    for corner in [*corners[1:], corners[0]]:
        page.mouse.move(*corner, steps=8)
    page.mouse.up()
    page.get_by_text(re.compile(r"Selection: \d+ prototypes?")).wait_for()
    card = page.get_by_role("heading", name=re.compile(r"Prototype \d+")).first
    card.wait_for()
    idle(page)
    shot(page, "atlas-card", top=page.get_by_text(re.compile(r"Selection: \d+ prototypes?")))

    # Trace: generate, then pick the third token
    nav(page, "Trace")
    page.get_by_role("button", name=re.compile(r"^Trace")).click()
    page.get_by_text(re.compile(r"token 1 / \d+")).wait_for()
    page.get_by_test_id("stButtonGroup").get_by_role("radio").nth(2).click()
    page.get_by_text(re.compile(r"token 3 / \d+")).wait_for()
    check = page.get_by_text(re.compile(r"Σ slices = logit \(\|error\| = "))
    check.wait_for()
    idle(page)
    shot(page, "trace", top=page.get_by_test_id("stButtonGroup"))

    # Issue 17, item 1: click a slice (card, gain 1), trace an empty prompt (error), trace twice:
    # the card's slider still shows 1 and no control appears in the sidebar or the completion
    page.locator(".js-plotly-plot .point path").first.click(force=True)
    gain = page.get_by_role("slider", name="Gain")
    gain.wait_for()
    assert gain_shown(page) == 1.0
    prompt = page.get_by_label("Prompt")
    text = prompt.input_value()
    prompt.fill("")
    page.get_by_role("button", name=re.compile(r"^Trace")).click()
    page.get_by_text("Cannot trace").wait_for()
    idle(page)
    prompt.fill(text)
    for _ in range(2):
        page.get_by_role("button", name=re.compile(r"^Trace")).click()
        page.get_by_text(re.compile(r"token 1 / \d+")).wait_for()
        gain.wait_for()
        idle(page)
        assert gain_shown(page) == 1.0
        assert page.get_by_test_id("stSidebar").get_by_text("none (the model as trained)").is_visible()
        assert page.get_by_text(re.compile(r"Completion.*no controls")).is_visible()

    # Steer: add a gain slider for the target prototype, move it to 0, see the text change
    nav(page, "Steer")
    page.get_by_text("No controls in force").wait_for()
    original = page.get_by_test_id("stHtml").nth(1).inner_text()
    page.get_by_label("Prototype id").fill(str(target))
    page.get_by_label("Prototype id").press("Enter")
    idle(page)
    page.get_by_role("button", name="Add a gain slider").click()
    slider = page.get_by_role("slider", name="Gain")
    slider.wait_for()
    slider.focus()
    page.keyboard.press("Home")  # gain 1.0 -> 0.0
    page.get_by_text(re.compile(r"First difference at token \d+")).wait_for()
    idle(page)
    steered = page.get_by_test_id("stHtml").nth(1).inner_text()
    assert steered != original
    shot(page, "steer", top=page.get_by_text("Controls of this session"))
    # undo (sidebar) restores the previous controls: none, and the original text
    page.get_by_test_id("stSidebar").get_by_role("button", name="Undo").click()
    page.get_by_text("No controls in force").wait_for()
    idle(page)
    assert page.get_by_test_id("stHtml").nth(1).inner_text() == original
    assert gain_shown(page) == 1.0

    # Calibrate: the page and its demo tasks load
    nav(page, "Calibrate")
    page.get_by_text("Demo task").first.wait_for()
    idle(page)
    shot(page, "calibrate")

    # Report: download the HTML and read it
    nav(page, "Report")
    button = page.get_by_role("button", name="Download HTML (offline)")
    button.wait_for()
    idle(page)
    shot(page, "report")
    with page.expect_download() as download:
        button.click()
    path = tmp_path / "report.html"
    download.value.save_as(path)
    text = path.read_text(encoding="utf-8")
    from core import model_fingerprint

    assert "PRISM attribution report" in text and model_fingerprint(DEMO) in text
    assert "Σ slices =" in text and "<svg" in text and "ROMEO. But soft, what light" in text
    assert "<script src" not in text and "cdn" not in text.lower()
    page.goto(path.as_uri())  # the report on its own, offline
    page.get_by_text("Σ slices =").first.wait_for()
    shot(page, "report-html")
