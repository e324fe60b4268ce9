"""Retakes docs/eval-report.png: the first screen of an evaluation report in headless Chromium.

    python -m tools.eval_screenshot out/eval/dag-report.html docs/eval-report.png
"""

from __future__ import annotations

import argparse
import os

from tools import browser as chromium


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="an HTML report written by python -m erasekit.eval --report")
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--size", default="1100,1250", help="window size, px")
    a = ap.parse_args(argv)
    driver = chromium.start(size=a.size)
    try:
        driver.get("file://" + os.path.abspath(a.report))
        tmp = a.out + ".tmp.png"
        driver.save_screenshot(tmp)
        os.replace(tmp, a.out)
    finally:
        driver.quit()
    print(a.out)


if __name__ == "__main__":
    main()
