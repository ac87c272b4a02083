"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium (issue #24's acceptance).

GET /dashboard on a `jitney serve --model tiny-random` with an API key: the page loads with no console errors,
updates while requests run, shows the KV block counts /metrics reports once the server is quiet, and is refused
without the key. `jitney view` over a bench recording: play, pause, seek and speed move both panes.

`make test` installs chromium and chromium-driver with apt-get where /usr/bin/chromium is missing; a machine where
that failed skips these tests and says why.
"""
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from .server_helpers import REPO, jitney_server, parse_metrics, wait_until

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEY = "dash-key-1"
TINY = ("--dtype", "float32", "--kv-cache-memory", "32MiB")
ENV = {"OMP_NUM_THREADS": "1"}

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    WHY_NOT = None
except ImportError:
    WHY_NOT = "selenium is not installed (pip install -e '.[test]')"
if WHY_NOT is None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        WHY_NOT = (f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver "
                   "(`make test` runs apt-get for them; it could not here)")
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="jitney-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    with jitney_server(*TINY, "--api-key", KEY, env=ENV) as s:
        yield s


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def number(driver, pane: int, cls: str) -> int:
    text = driver.find_element(By.CSS_SELECTOR, f'[data-pane="{pane}"] .{cls}').text
    return int(text) if re.fullmatch(r"-?\d+", text) else -1


def status(driver) -> str:
    return driver.find_element(By.ID, "status").text


def test_live_page_follows_the_engine_and_agrees_with_metrics(browser, server):
    browser.get(f"{server.url}/dashboard?api_key={KEY}")
    assert wait_until(lambda: status(browser) == "live", 15), status(browser)
    assert "api_key" not in browser.current_url  # the key left the address bar
    # "live" comes with the stream's opening; the first snapshot paints a moment later.
    assert wait_until(lambda: number(browser, 0, "kv-total") > 0, 15), number(browser, 0, "kv-total")
    before = number(browser, 0, "steps")
    seen_running = []

    def watch():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not done.is_set():
            seen_running.append(number(browser, 0, "running"))
            time.sleep(0.05)

    done = threading.Event()
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny-random", "prompt": "The quick brown fox", "max_tokens": 600, "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers=h, timeout=60) as client:
        # The browser is driven from one thread at a time: sample it here while requests run in threads.
        results = []
        senders = [threading.Thread(target=lambda: results.append(client.post("/v1/completions", json=body)))
                   for _ in range(4)]
        for t in senders:
            t.start()
        deadline = time.monotonic() + 30
        while any(t.is_alive() for t in senders) and time.monotonic() < deadline:
            seen_running.append(number(browser, 0, "running"))
            time.sleep(0.05)
        for t in senders:
            t.join(30)
        assert [r.status_code for r in results] == [200] * 4
        assert max(seen_running) >= 1, seen_running  # it updated while requests ran
        assert number(browser, 0, "steps") >= before + 600
        # A quiet moment: the page's next state event (one a second while idle) has the blocks as they are.
        time.sleep(2.5)
        metrics = parse_metrics(client.get("/metrics").text)
    assert number(browser, 0, "kv-used") == metrics[("jitney_kv_cache_blocks_used", ())]
    assert number(browser, 0, "kv-total") == metrics[("jitney_kv_cache_blocks_total", ())]
    assert number(browser, 0, "kv-free") + number(browser, 0, "kv-evictable") + number(browser, 0, "kv-used") \
        == number(browser, 0, "kv-total")
    assert number(browser, 0, "kv-evictable") > 0  # the finished requests' prompt blocks stay cached
    assert number(browser, 0, "running") == 0
    assert not console_errors(browser), console_errors(browser)


def test_without_the_key_the_page_and_its_stream_are_refused(browser, server):
    browser.get(f"{server.url}/dashboard")
    body = json.loads(browser.find_element(By.TAG_NAME, "body").text)
    assert body["error"]["code"] == "invalid_api_key"
    status_code = browser.execute_async_script(
        "const done = arguments[0]; fetch('/v1/engine/steps').then(r => done(r.status), e => done(String(e)));")
    assert status_code == 401
    browser.get_log("browser")  # the refusals above are logged as console errors by design: clear them


def record(tmp: Path) -> Path:
    """static and continuous on the same quick trace, recorded by `jitney bench --record-steps`."""
    path = tmp / "steps.jsonl"
    subprocess.run([sys.executable, "-m", "jitney.cli", "bench", "--quick", "--model", "tiny-random", "--policies",
                    "static,continuous", "--no-progress", "--record-steps", str(path), "--out", str(tmp / "out")],
                   cwd=REPO, check=True, capture_output=True, timeout=300, env={**__import__("os").environ, **ENV})
    return path


def test_view_replays_two_recordings_side_by_side(browser, tmp_path):
    path = record(tmp_path)
    runs: list[list[dict]] = []
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event["type"] == "hello":
            runs.append([])
        runs[-1].append(event)
    assert [r[0]["label"] for r in runs] == ["static", "continuous"]
    steps = [sum(e["type"] == "step" for e in r) for r in runs]
    from benchmarks.screenshots import start_view
    proc, url = start_view([path])
    try:
        assert url, "jitney view printed no URL"
        browser.get(url)
        assert wait_until(lambda: status(browser) == "replay: paused", 15), status(browser)
        titles = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".pane .title")]
        assert titles == ["static", "continuous"]
        assert number(browser, 0, "steps") == number(browser, 1, "steps") == 0
        # play at 0.1x: the replay moves; pause: it stops
        browser.execute_script("document.getElementById('speed').value = '0.1';")
        browser.find_element(By.ID, "play").click()
        assert wait_until(lambda: number(browser, 0, "steps") + number(browser, 1, "steps") > 0, 20)
        browser.find_element(By.ID, "play").click()
        assert status(browser) == "replay: paused"  # (0.1x: the quick trace's runs last a few seconds)
        frozen = (number(browser, 0, "steps"), number(browser, 1, "steps"), browser.find_element(By.ID, "clock").text)
        time.sleep(0.5)
        assert (number(browser, 0, "steps"), number(browser, 1, "steps"),
                browser.find_element(By.ID, "clock").text) == frozen
        assert frozen[0] < steps[0] or frozen[1] < steps[1]
        seek = "const s = document.getElementById('seek'); s.value = arguments[0]; s.dispatchEvent(new Event('input'));"
        # seek to the middle: both panes part way (one clock for both)
        both = lambda: (number(browser, 0, "steps"), number(browser, 1, "steps"))  # noqa: E731
        browser.execute_script(seek, "500")  # (the page draws at its next animation frame: poll)
        middle = wait_until(lambda: (m := both()) and (0 < m[0] < steps[0] or 0 < m[1] < steps[1]) and m, 5)
        assert middle, (both(), steps)
        # seek to the end: every step of both runs; back to the start: none
        browser.execute_script(seek, "1000")
        assert wait_until(lambda: both() == tuple(steps), 5), (both(), steps)
        browser.execute_script(seek, "0")
        assert wait_until(lambda: both() == (0, 0), 5), both()
        # play at 10x from the start: it reaches the end on its own
        browser.execute_script("const s = document.getElementById('speed'); s.value = '10';")
        browser.find_element(By.ID, "play").click()
        assert wait_until(lambda: status(browser) == "replay: at the end", 30), status(browser)
        assert wait_until(lambda: both() == tuple(steps), 5), (both(), steps)
        assert not console_errors(browser), console_errors(browser)
    finally:
        proc.terminate()
        proc.wait(10)
