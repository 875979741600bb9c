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
def server(hostile_bundle):
    """`streamlit run explorer/app.py` on a free port; yields its URL; stopped afterwards.

    It may open the demo bundle and the hostile bundle (tests/explorer/hostile.py), by name.
    """
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
    env = {**os.environ, "PRISM_EXPLORER_BUNDLES": os.pathsep.join([str(DEMO.parent), str(hostile_bundle.parent)])}
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
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


def waterfall_steps(page) -> list:
    """The (label, value) steps of the first waterfall on the page, as the browser holds them."""
    return page.evaluate("""() => {
        const charts = [...document.querySelectorAll('.js-plotly-plot')];
        const gd = charts.find(g => g._fullData && g._fullData.length && g._fullData[0].type === 'waterfall');
        const trace = gd._fullData[0];
        return Array.from(trace.y).map((y, i) => [y, Number(trace.x[i]).toFixed(6)]);
    }""")


def gain_shown(page) -> float:
    """The value the (one) Gain slider on screen shows on its thumb."""
    slider = page.get_by_test_id("stSlider").filter(has=page.get_by_role("slider", name="Gain"))
    return float(slider.get_by_test_id("stSliderThumbValue").inner_text())


def steering_target() -> int:
    """A prototype whose gain 0 changes the Steer page's greedy text (its Greedy toggle on; checked in
    core): a sampled text keeps its seed's draws through a small change of the distribution."""
    from core import GREEDY, Controls, decompose, generate_text, load_bundle

    bundle = load_bundle(DEMO)
    original = generate_text(bundle, STEER_PROMPT, max_new_tokens=64, settings=GREEDY).text
    first = decompose(bundle, prompt=STEER_PROMPT, max_new_tokens=1, generation=GREEDY).tokens[0]
    for p in first.prototypes:
        gain0 = Controls(gains={p.id: 0.0})
        steered = generate_text(bundle, STEER_PROMPT, max_new_tokens=64, controls=gain0, settings=GREEDY)
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
    # a click on a point in the default (lasso) drag mode opens its card, in view beside the map
    point = page.evaluate("""() => {
        const gd = document.querySelector('.stPlotlyChart .js-plotly-plot');
        const trace = gd._fullData[0], layout = gd._fullLayout;
        const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
        let best = 0;  // the largest marker: the easiest to hit
        for (let i = 1; i < trace.x.length; i++) if (trace.marker.size[i] > trace.marker.size[best]) best = i;
        return {x: r.left + layout.xaxis.l2p(trace.x[best]), y: r.top + layout.yaxis.l2p(trace.y[best]),
                mode: layout.dragmode};
    }""")
    assert point["mode"] == "lasso"
    page.mouse.move(point["x"], point["y"])
    time.sleep(0.5)
    page.mouse.click(point["x"], point["y"])
    page.get_by_text("Selection: 1 prototype", exact=True).wait_for()
    heading = page.get_by_role("heading", name=re.compile(r"Prototype \d+")).first
    heading.wait_for()
    top = heading.bounding_box()["y"]
    assert 0 <= top < page.viewport_size["height"], top  # in view: no scrolling needed
    idle(page)
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
    shot(page, "atlas-card", top=page.get_by_role("heading", name="Atlas"))  # the map with its cards beside it

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

    # a permalink copied from Trace opens the same token with the same slices in a new browser context
    page.locator(".js-plotly-plot .point path").nth(1).click(force=True)
    page.get_by_role("slider", name="Gain").wait_for()
    idle(page)
    card_heading = page.get_by_role("heading", name=re.compile(r"Prototype \d+")).first.inner_text()
    assert "prompt=" in page.url and "token=2" in page.url and "card=" in page.url, page.url
    slices = waterfall_steps(page)
    other = page.context.browser.new_context(viewport={"width": 1400, "height": 1300})
    other.set_default_timeout(TIMEOUT_MS)
    fresh = other.new_page()
    fresh.goto(page.url)
    fresh.get_by_text(re.compile(r"token 3 / \d+")).wait_for()
    fresh.get_by_role("heading", name=card_heading, exact=True).wait_for()
    idle(fresh)
    fresh.locator(".js-plotly-plot .point path").first.wait_for()
    time.sleep(0.5)
    assert waterfall_steps(fresh) == slices
    other.close()

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
    # the card is in the token view's fragment: a gain set on it reruns the whole app (the sidebar shows it)
    card = page.get_by_role("heading", name=re.compile(r"Prototype \d+")).first.inner_text().split()[-1]
    gain.focus()
    page.keyboard.press("ArrowLeft")  # 1.00 -> 0.95
    page.get_by_test_id("stSidebar").get_by_text(f"1 gain: #{card}×0.95", exact=False).wait_for()
    idle(page)
    page.get_by_test_id("stSidebar").get_by_role("button", name="Undo").click()
    page.get_by_test_id("stSidebar").get_by_text("none (the model as trained)").wait_for()
    idle(page)

    # Steer: add a gain slider for the target prototype, move it to 0, see the text change
    nav(page, "Steer")
    page.get_by_text("No controls in force").wait_for()
    page.get_by_text("Greedy", exact=True).click()  # the texts steering_target checked
    page.get_by_text("Both texts generated greedily.").wait_for()
    idle(page)
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
    shot(page, "steer", top=page.get_by_role("heading", name="Steer"))  # the texts, then the controls
    # undo (sidebar) restores the previous controls: none, and the original text
    page.get_by_test_id("stSidebar").get_by_role("button", name="Undo").click()
    page.get_by_text("No controls in force").wait_for()
    idle(page)
    assert page.get_by_test_id("stHtml").nth(1).inner_text() == original
    assert gain_shown(page) == 1.0

    # Compare: two prompts side by side, both texts shown
    nav(page, "Compare")
    page.get_by_text("two prompts, the session's controls").click()
    page.get_by_role("textbox", name="Prompt B").wait_for()
    idle(page)
    texts = page.locator(".prism-snip").all_inner_texts()
    assert len(texts) == 2 and all(t.strip() for t in texts), texts
    shot(page, "compare")

    # Calibrate: the page and its demo tasks load
    nav(page, "Calibrate")
    page.get_by_text("Demo task").first.wait_for()
    idle(page)
    shot(page, "calibrate")

    # Outliers: the demo's training documents by self-influence (the demo ships the self-influence file)
    from core.attribution.influence import outliers

    nav(page, "Outliers")
    page.get_by_test_id("stDataFrame").wait_for()
    idle(page)
    found = outliers(DEMO, top=None)
    page.get_by_text(f"25 of {found['documents']:,} training documents").wait_for()  # the grid draws on a canvas
    bars = page.evaluate("""() => {
        const gd = [...document.querySelectorAll('.js-plotly-plot')].find(g => g._fullData && g._fullData.length);
        return gd._fullData.reduce((n, t) => n + t.x.length, 0);
    }""")
    assert bars == int((found["all_scores"] > 0).sum())  # every document in the histogram
    shot(page, "outliers")

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


def assert_no_markup(page, where: str) -> None:
    """Nothing on screen came from hostile text rendered as markup: no link to the hostile site,
    no colour, badge or icon directive in markdown, no KaTeX, no hostile bold."""
    found = page.evaluate("""() => ({
        links: [...document.querySelectorAll('a[href*="evil"]')].length,
        colour: document.querySelectorAll(
            '.stMarkdownColoredText, .stMarkdownColoredBackground, .stMarkdownBadge').length,
        katex: document.querySelectorAll('.katex').length,
        icons: document.querySelectorAll('[data-testid=stMarkdownContainer] [data-testid=stIconMaterial]').length,
        bold: [...document.querySelectorAll('b, strong')].filter(e => e.textContent.includes('HOSTILEBOLD')).length,
        legend: [...document.querySelectorAll('.legend a, .legendtext a')].length,
        offenders: [...document.querySelectorAll('a[href*="evil"], .legend a, .legendtext a, .katex')]
            .map(e => (e.closest('[data-testid]') || e).getAttribute('data-testid') + ': ' + e.outerHTML.slice(0, 200)),
    })""")
    offenders = found.pop("offenders")
    assert all(v == 0 for v in found.values()), (where, found, offenders)


def test_hostile_corpus_is_text_in_the_browser(page, server, hostile_bundle, tmp_path):
    from tests.explorer import hostile

    page.goto(server)
    page.get_by_test_id("stPlotlyChart").wait_for()
    idle(page)
    field = page.get_by_test_id("stSidebar").get_by_role("textbox", name="Bundle folder")
    field.fill(hostile_bundle.name)
    field.press("Enter")
    idle(page)
    page.get_by_test_id("stPlotlyChart").wait_for()
    assert_no_markup(page, "atlas")
    page.get_by_test_id("stButtonGroup").get_by_text("source", exact=True).click()
    idle(page)
    page.locator(".legendtext").filter(has_text="evil.example").first.wait_for()  # drawn, as text
    assert_no_markup(page, "atlas by source")
    page.get_by_label("Search labels and neighbourhood text").fill("hostile note")
    page.get_by_label("Search labels and neighbourhood text").press("Enter")
    page.get_by_role("button", name=re.compile(r"^Open the")).click()
    page.get_by_role("heading", name=re.compile(r"Prototype \d+")).first.wait_for()
    idle(page)
    assert_no_markup(page, "atlas cards")
    assert page.get_by_text(":red[HOSTILERED]").count() > 0  # the directive shown as its text
    with page.expect_download() as download:
        page.get_by_role("button", name="Export selection (CSV)").click()
    path = tmp_path / "selection.csv"
    download.value.save_as(path)
    import csv

    cells = [c for row in csv.reader(path.open(encoding="utf-8")) for c in row]
    assert cells and not any(c.startswith(hostile.FORMULAS) for c in cells), [c for c in cells if c[:1] in "=+-@"]
    assert any(c.startswith("'=cmd") for c in cells)

    nav(page, "Trace")
    page.get_by_label("Prompt").fill(" ".join(hostile.HOSTILE))
    page.get_by_role("button", name=re.compile(r"^Trace")).click()
    page.get_by_text(re.compile(r"token 1 / \d+")).wait_for()
    idle(page)
    assert_no_markup(page, "trace")
    page.locator(".js-plotly-plot .point path").first.click(force=True)
    page.get_by_role("slider", name="Gain").wait_for()
    idle(page)
    assert_no_markup(page, "trace card")

    nav(page, "Steer")
    prompt = page.get_by_role("textbox", name="Prompt", exact=True)
    prompt.fill(hostile.KATEX + " " + hostile.LINK)
    prompt.press("Control+Enter")
    idle(page)
    assert_no_markup(page, "steer")
    for page_name in ("Calibrate", "Report"):
        nav(page, page_name)
        idle(page)
        assert_no_markup(page, page_name)
    shot(page, "hostile-report")


def test_dark_theme_is_followed(page, server):
    """With the browser in dark mode the app is dark, and its map and waterfall draw on it."""
    browser = page.context.browser
    context = browser.new_context(viewport={"width": 1400, "height": 1300}, color_scheme="dark")
    context.set_default_timeout(TIMEOUT_MS)
    dark = context.new_page()
    dark.goto(server)
    dark.locator(".js-plotly-plot .nsewdrag").first.wait_for()
    idle(dark)
    background = dark.evaluate("() => getComputedStyle(document.querySelector('[data-testid=stApp]')).backgroundColor")
    channels = [int(c) for c in re.findall(r"\d+", background)[:3]]
    assert max(channels) < 80, background  # a dark page
    shot(dark, "atlas-dark")
    dark.goto(server + "/trace?prompt=ROMEO.+But+soft%2C+what+light&token=2&n=16&card=738")
    dark.get_by_text(re.compile(r"token 3 / \d+")).wait_for()
    dark.locator(".js-plotly-plot .point path").first.wait_for()
    idle(dark)
    shot(dark, "trace-dark", top=dark.get_by_test_id("stButtonGroup"))
    context.close()


def test_atlas_card_panel_and_its_controls(page, server):
    """Another card of the selection opens in the card panel (a fragment: it reruns alone, and
    the permalink follows it); a control set from that card reruns the whole page, so the
    sidebar shows it; undo takes it back."""
    page.goto(server + "/?picked=16,43,63&acard=16")
    page.get_by_role("heading", name="Prototype 16", exact=True).wait_for()
    idle(page)
    chooser = page.get_by_test_id("stSelectbox").filter(has_text=re.compile(r"Card \(\d+ prototypes selected\)"))
    chooser.click()
    option = page.get_by_role("option").nth(1)
    chosen = option.inner_text().split()[0].lstrip("#")  # "#43 label"
    option.click()
    page.get_by_role("heading", name=f"Prototype {chosen}", exact=True).wait_for()
    idle(page)
    assert f"acard={chosen}" in page.url, page.url
    sidebar = page.get_by_test_id("stSidebar")
    page.get_by_text("Suppress", exact=True).first.click()  # the card's toggle
    sidebar.get_by_text(f"1 suppressed prototype: #{chosen}").wait_for()
    idle(page)
    assert page.evaluate("""() => document.querySelector('.stPlotlyChart .js-plotly-plot')._fullData
        .some(t => t.name === 'suppressed')""")  # the map marks it: the whole page ran
    sidebar.get_by_role("button", name="Undo").click()
    sidebar.get_by_text("none (the model as trained)").wait_for()
