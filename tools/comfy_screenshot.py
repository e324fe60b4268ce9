"""The README's ComfyUI screenshot: the side-by-side example workflow, run in the real ComfyUI web
UI (headless Chromium) on the bundled toy model with the shipped guideline embedding.

    python -m tools.comfy_screenshot [--out docs/comfyui-detect-and-guide.png] [--strength 4]

Starts ComfyUI's own server on a scratch base directory (the pack, ``models/toy`` and
``models/guideline`` linked in), loads ``example_workflows/detect_and_guide_side_by_side.json``,
queues it from the page as a person does (the Run button's action), waits for the images and the
live detection map, and saves a screenshot at a zoom where the node titles and widgets are drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

from tools import REPO

WORKFLOW = os.path.join(REPO, "example_workflows", "detect_and_guide_side_by_side.json")


def _wait_for(browser, script, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        value = browser.execute_script(script)
        if value:
            return value
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "comfyui-detect-and-guide.png"))
    ap.add_argument("--strength", type=float, default=None, help="Detect-and-Guide's strength (default: the workflow's)")
    ap.add_argument("--size", default="1900,1100", help="browser window, pixels")
    ap.add_argument("--zoom", type=float, default=0.8)
    a = ap.parse_args(argv)

    from tools import browser as chromium
    from tools.comfy_server import get_json, serve

    base = pathlib.Path(tempfile.mkdtemp(prefix="erasekit-shot-"))
    for sub, src in (("diffusers/toy", "models/toy"),
                     ("guideline/toy-red-circle.safetensors", "models/guideline/toy-red-circle.safetensors")):
        dst = base / "models" / sub
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.join(REPO, src), dst)
    workflow = json.load(open(WORKFLOW))
    if a.strength is not None:
        for node in workflow["nodes"]:
            if node["type"] == "ErasekitDetectAndGuide":
                node["widgets_values"][2] = a.strength
    with serve(base) as url:
        browser = chromium.start(size=a.size)
        try:
            browser.get(url)
            _wait_for(browser, "return !!(window.app && window.app.graph)", 90, "ComfyUI's page")
            from selenium.webdriver.common.keys import Keys

            browser.find_element("tag name", "body").send_keys(Keys.ESCAPE)  # the first visit's Templates dialog
            browser.execute_script("return window.app.loadGraphData(arguments[0])", workflow)
            time.sleep(2)
            browser.execute_script("return window.app.queuePrompt(0, 1)")
            _wait_for(browser, "return window.erasekitLastDetection || null", 240, "the live detection map")
            end = time.time() + 240
            while time.time() < end:
                queue = get_json(url + "/queue")
                if not queue["queue_running"] and not queue["queue_pending"]:
                    break
                time.sleep(1)
            time.sleep(2)  # the last images reach the page
            browser.execute_script("const c = window.app.canvas; c.ds.scale = arguments[0]; c.ds.offset = [50, 120];"
                                   "c.setDirty(true, true);", a.zoom)
            time.sleep(1)
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            browser.save_screenshot(a.out)
        finally:
            browser.quit()
    print(json.dumps({"screenshot": a.out, "base": str(base)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
