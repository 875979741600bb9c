"""Concurrent Steer sessions against one explorer server: latency, errors and server memory.

    python bench/load.py [--model assets/models/demo] [--sessions 1,4,8] [--requests 5]

Starts `streamlit run explorer/app.py` on the bundle, bound to 127.0.0.1 only, and opens N
browser sessions on it (headless Chromium, Debian's, through playwright: each session is a
separate browser context, so a separate Streamlit session with its own state). Every session
opens the Steer page, then regenerates --requests times: it types a new seed into Steer's Seed
field, which no earlier request used, so neither text comes from the cache, and waits until the
page has finished running and says the text was "generated just now". The N sessions do this at
the same time; a request's latency runs from the key press to that caption on screen.

For each N: median and 95th-percentile latency over all requests, errors (a request that timed
out, or a page that shows an exception or an error), and the server's resident memory (VmRSS
of the `streamlit` process) before the sessions open and after they finish. Bounded: at most
16 sessions, and each round gives up after --round-timeout seconds (its unfinished requests
count as errors). The load average of the machine is recorded with the figures, since other
work on it changes every latency.

Prints a table, then one JSON line, also written to bench/results/load.json (bench/_results.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import _results  # noqa: E402
from _streamlit import start_streamlit  # noqa: E402

CHROMIUM = os.environ.get("PRISM_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
MAX_SESSIONS = 16
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
RUNNING = "[data-testid='stApp'][data-test-script-state='running']"
FAILED = "[data-testid='stException'], [data-testid='stAlertContentError']"
FRESH = re.compile(r"Steered: generated just now")


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    """`streamlit run explorer/app.py -- --model MODEL` on a free loopback port."""
    return start_streamlit(REPO / "explorer" / "app.py", ["--model", model], timeout_s=120)


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


async def idle(page) -> None:
    await asyncio.sleep(0.05)
    await page.wait_for_selector(IDLE)


async def open_steer(browser, url: str):
    """A new session (browser context) on the Steer page, idle."""
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await context.new_page()
    page.set_default_timeout(600_000)
    await page.goto(url)
    await page.get_by_test_id("stTopNavLink").filter(has_text="Steer").click()
    await page.get_by_label("Seed").wait_for()
    await idle(page)
    await page.get_by_text(FRESH).or_(page.get_by_text("reused from the cache")).first.wait_for()
    return context, page


async def regenerate(page, seed: int) -> float:
    """Type a new seed, wait for the fresh text on screen; the seconds it took.

    Raises:
        RuntimeError: the page shows an exception or an error.
    """
    field = page.get_by_label("Seed")
    await field.fill(str(seed))
    t0 = time.perf_counter()
    await field.press("Enter")
    try:
        await page.wait_for_selector(RUNNING, timeout=5_000)
    except Exception:  # noqa: BLE001 - the run may already be over
        pass
    await idle(page)
    if await page.locator(FAILED).count():
        raise RuntimeError((await page.locator(FAILED).first.inner_text())[:200])
    await page.get_by_text(FRESH).wait_for()
    return time.perf_counter() - t0


async def one_round(browser, url: str, sessions: int, requests: int, first_seed: int, timeout: float) -> dict:
    """N sessions regenerating at once; their latencies and errors."""
    opened = await asyncio.gather(*(open_steer(browser, url) for _ in range(sessions)))
    latencies: list[float] = []
    errors: list[str] = []

    async def session(i: int, page) -> None:
        for r in range(requests):
            try:
                latencies.append(await regenerate(page, first_seed + i * requests + r))
            except Exception as err:  # noqa: BLE001 - an error is a figure here, not a crash
                errors.append(f"session {i} request {r}: {type(err).__name__}: {str(err)[:200]}")

    tasks = [asyncio.create_task(session(i, page)) for i, (_, page) in enumerate(opened)]
    t0 = time.perf_counter()
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    wall = time.perf_counter() - t0
    missing = sessions * requests - len(latencies) - len(errors)
    if missing:
        errors.append(f"{missing} requests unfinished after the round's {timeout:.0f} s")
    for context, _ in opened:
        await context.close()
    return {"latencies": latencies, "errors": errors, "wall": wall, "unfinished": missing}


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered) + 0.5) - 1))]


async def run(args: argparse.Namespace) -> dict:
    from playwright.async_api import async_playwright

    figures: dict = {
        "cpu_cores": os.cpu_count(),
        "requests_per_session": args.requests,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    process, url = start_server(args.model)
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=CHROMIUM, args=["--use-gl=swiftshader", "--enable-unsafe-swiftshader"]
            )
            context, page = await open_steer(browser, url)  # warm-up: model, index and page cached
            await regenerate(page, 10**6)
            await context.close()
            figures["rss_start_mb"] = rss_mb(process.pid)
            for n in args.sessions:
                before = rss_mb(process.pid)
                load_before = round(os.getloadavg()[0], 2)
                result = await one_round(browser, url, n, args.requests, 100 * n, args.round_timeout)
                lat = result["latencies"]
                figures |= {
                    f"n{n}_requests": n * args.requests,
                    f"n{n}_median_s": round(statistics.median(lat), 2) if lat else None,
                    f"n{n}_p95_s": round(p95(lat), 2) if lat else None,
                    f"n{n}_max_s": round(max(lat), 2) if lat else None,
                    f"n{n}_errors": len(result["errors"]) - (1 if result["unfinished"] else 0) + result["unfinished"],
                    f"n{n}_round_s": round(result["wall"], 1),
                    f"n{n}_rss_before_mb": before,
                    f"n{n}_rss_after_mb": rss_mb(process.pid),
                    f"n{n}_load_average_1min_before": load_before,
                    f"n{n}_load_average_1min_after": round(os.getloadavg()[0], 2),
                }
                for line in result["errors"][:5]:
                    print(f"N={n}: {line}", file=sys.stderr)
            await browser.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    figures["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "assets" / "models" / "demo"))
    parser.add_argument("--sessions", default="1,4,8", help=f"comma-separated session counts (each 1..{MAX_SESSIONS})")
    parser.add_argument("--requests", type=int, default=5, help="regenerations per session (1..50)")
    parser.add_argument("--round-timeout", type=float, default=600, help="seconds before a round gives up")
    _results.add_arguments(parser)
    args = parser.parse_args()
    args.sessions = [int(n) for n in args.sessions.split(",")]
    if not all(1 <= n <= MAX_SESSIONS for n in args.sessions) or not 1 <= args.requests <= 50:
        parser.error(f"--sessions must lie in 1..{MAX_SESSIONS} and --requests in 1..50")
    if not Path(CHROMIUM).is_file():
        parser.error(f"no Chromium at {CHROMIUM}: `apt-get install chromium` or set PRISM_CHROMIUM")
    figures = asyncio.run(run(args))
    header = ("sessions", "requests", "median s", "p95 s", "errors", "RSS before/after MB", "load before/after")
    rows = []
    for n in args.sessions:
        f = {k.removeprefix(f"n{n}_"): v for k, v in figures.items() if k.startswith(f"n{n}_")}
        rows.append(
            (
                n,
                f["requests"],
                f["median_s"],
                f["p95_s"],
                f["errors"],
                f"{f['rss_before_mb']} / {f['rss_after_mb']}",
                f"{f['load_average_1min_before']} / {f['load_average_1min_after']}",
            )
        )
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(str("-" if x is None else x).rjust(w) for x, w in zip(row, widths, strict=True)))
    _results.emit(figures, args, __file__)


if __name__ == "__main__":
    main()
