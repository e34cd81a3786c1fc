"""Regenerate docs/demo.png: start `derm-accel demo`, upload one image in headless Chromium, screenshot the page.

    python docs/demo_screenshot.py --model RUN/best --image ../shared/data/derm-sample/nevus/ISIC_0000000.jpg

Uses the system Chromium through Playwright (`apt-get install chromium`; no browser download).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "demo.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    demo = subprocess.Popen([sys.executable, "-m", "derm_accel", "demo", "--model", args.model, "--port", str(port)],
                            env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if demo.poll() is not None:
                    sys.exit("derm-accel demo exited")
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url)
            page.locator("#upload input[type=file]").set_input_files(str(args.image))
            page.locator("#verdict").get_by_text("Top class").wait_for(timeout=120_000)
            page.locator("#gradcam img").wait_for(timeout=60_000)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        demo.terminate()
        demo.wait(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
