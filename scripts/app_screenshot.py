"""docs/figures/app.png: `alignsam app` on a bundle in headless chromium, an image uploaded, the slider at a step.

    python scripts/app_screenshot.py --bundle demo_out/bundles/synthetic_shapes \
        --image demo_out/bundles/synthetic_shapes/examples/00000.png --step 5 [--eval demo_out/eval/synthetic_shapes] \
        [--tab Evaluation] --out docs/figures/app.png

Needs the app and dev extras (gradio, selenium) and Debian's chromium + chromium-driver.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--step", type=int, default=None, help="slider position (default: T)")
    ap.add_argument("--eval")
    ap.add_argument("--tab", default="Segment", choices=["Segment", "Evaluation"])
    ap.add_argument("--out", default="docs/figures/app.png")
    ap.add_argument("--size", default="1400,1000")
    args = ap.parse_args()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "alignsam_ray.cli", "app", "--bundle", args.bundle, "--port", str(port)]
    server = subprocess.Popen(cmd + (["--eval", args.eval] if args.eval else []))
    options = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={args.size}"):
        options.add_argument(a)
    driver = None
    try:
        for _ in range(240):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        driver = webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"), options=options)
        driver.get(f"http://127.0.0.1:{port}")
        wait = WebDriverWait(driver, 120)
        caption = lambda: driver.find_element(By.CSS_SELECTOR, "#caption").text  # noqa: E731
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]")).send_keys(
            os.path.abspath(args.image))
        wait.until(lambda d: caption().startswith("step "))
        T = int(caption().split(" of ")[1].split(":")[0])
        slider = driver.find_element(By.CSS_SELECTOR, "#step input[type=range]")
        for _ in range(T - (T if args.step is None else args.step)):
            slider.send_keys(Keys.ARROW_LEFT)
        if args.step is not None:
            wait.until(lambda d: caption().startswith(f"step {args.step} of"))
        if args.tab == "Evaluation":
            next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Evaluation").click()
            wait.until(lambda d: "IoU" in d.find_element(By.CSS_SELECTOR, "#methods").text)
        time.sleep(2)  # images finish drawing
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
