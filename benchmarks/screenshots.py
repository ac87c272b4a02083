"""docs/README.md's screenshots of the dashboard: simulated runs recorded, replayed in `jitney view`, photographed.

    .venv/bin/python -m benchmarks.screenshots --out docs/figures

Two pictures, each from `jitney simulate --record-steps` (story-6b on the hardware sheet's A100 80 GB, a 3 GiB KV
cache so that one cell of the block map is one block you can see; simulated, so it costs a few seconds of CPU and
gives the same events on every machine):
- view_static_continuous.png: static and continuous batching on the same Poisson trace (the README's "Step by
  step" lesson), side by side, at AT_S simulated seconds;
- view_prefix_cache.png: continuous batching on a workload whose prompts share a 512-token system prompt, prefix
  caching on beside off, at AT_S.
Each recording is served by `jitney view` on 127.0.0.1 and shot in Debian's
headless Chromium driven by Selenium, after seeking to that moment; the PNG is re-saved optimized (RGB, no
alphas; a flat-colour page compresses well: well under 300 KB). The recordings and the simulations' reports stay in --work.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
AT_S = 10.0           # simulated seconds into the runs: both are mid-trace (the traces last ~20 s)
WINDOW = (1400, 1010)  # browser window: two panes side by side

DEVICE = ("--device", "a100-80gb", "--model", "story-6b", "--kv-cache-memory", "3GiB", "--workload", "poisson",
          "--num-requests", "200", "--rate", "10", "--seed", "0")
# name: (simulate invocations, each (argv, recording file)); the view shows the first two runs of them.
SHOTS = {
    "view_static_continuous": [
        ((*DEVICE, "--prompt-len", "16,256", "--output-len", "8,256", "--policies", "static,continuous"),
         "static_continuous.jsonl")],
    "view_prefix_cache": [
        ((*DEVICE, "--prompt-len", "544,640", "--output-len", "8,128", "--shared-prefix", "512",
          "--policies", "continuous"), "prefix_on.jsonl"),
        ((*DEVICE, "--prompt-len", "544,640", "--output-len", "8,128", "--shared-prefix", "512",
          "--policies", "continuous", "--no-prefix-caching"), "prefix_off.jsonl")],
}


def simulate(argv: tuple[str, ...], recording: Path, work: Path) -> str:
    """One `jitney simulate --record-steps` in this process; returns its command line."""
    from sim.simulate import run_simulate
    full = [*argv, "--record-steps", str(recording), "--out", str(work / recording.stem), "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()):
        run_simulate(full)
    return ".venv/bin/jitney simulate " + " ".join(a for a in full if a != "--no-progress")


def end_time(recordings: list[Path]) -> float:
    """The replay's end: the last event's time over the runs the view shows (as dashboard.html computes it)."""
    from api.view import panes
    shown = panes([str(p) for p in recordings])
    return max(0.001, *(json.loads(lines[-1])["t"] for _, lines in shown))


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='jitney-shots-')}", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


def start_view(recordings: list[Path]) -> tuple[subprocess.Popen, str | None]:
    """`jitney view` over the recordings, in a child process: it, and the URL it prints (None if it printed none).
    The caller stops it."""
    proc = subprocess.Popen([sys.executable, "-m", "jitney.cli", "view", *map(str, recordings)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if m := re.search(r"open (http://127\.0\.0\.1:\d+/)", line):
            return proc, m.group(1)
    return proc, None


def shoot(driver, recordings: list[Path], at_s: float, png: Path) -> None:
    """Serve the recordings with `jitney view`, seek to at_s, save a PNG of the window."""
    from PIL import Image
    proc, url = start_view(recordings)
    try:
        if not url:
            raise RuntimeError("jitney view printed no URL")
        driver.get(url)
        deadline = time.time() + 20
        while driver.find_element("id", "status").text != "replay: paused":
            if time.time() > deadline:
                raise RuntimeError("the replay did not load")
            time.sleep(0.1)
        value = round(1000 * at_s / end_time(recordings))
        driver.execute_script("const s = document.getElementById('seek'); s.value = arguments[0]; "
                              "s.dispatchEvent(new Event('input'));", str(value))
        time.sleep(1.0)  # the page draws at its next animation frames
        raw = png.with_suffix(".raw.png")
        driver.save_screenshot(str(raw))
        Image.open(raw).convert("RGB").save(png, optimize=True)
        raw.unlink()
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.screenshots", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/figures", help="folder for the PNGs (default: docs/figures)")
    p.add_argument("--work", help="folder for the recordings and reports (default: a new temporary folder)")
    p.add_argument("--at", type=float, default=AT_S, help=f"simulated seconds to seek to (default: {AT_S:g})")
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work or tempfile.mkdtemp(prefix="jitney-screenshots-"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    driver = browser()
    try:
        for name, runs in SHOTS.items():
            recordings = []
            for sim_argv, file in runs:
                recordings.append(work / file)
                print(simulate(sim_argv, recordings[-1], work) + f"\n  -> {recordings[-1]}", flush=True)
            shoot(driver, recordings, args.at, out / f"{name}.png")
            print(f"jitney view {' '.join(map(str, recordings))}: at {args.at:g} s -> {out / name}.png "
                  f"({(out / f'{name}.png').stat().st_size / 1024:.0f} KB)", flush=True)
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
