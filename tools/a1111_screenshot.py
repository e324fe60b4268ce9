"""The Detect-and-Guide section in the real Automatic1111's txt2img page, opened, as a PNG (for the docs).

    python -m tools.a1111_screenshot [--out docs/a1111-detect-and-guide.png]
"""

import argparse
import os
import time

from tools import REPO, browser, webui

TITLE = "Detect-and-Guide (Erasekit)"


def open_section(driver, url: str, timeout: float = 180):
    """Load txt2img and open the section; returns its element."""
    driver.get(url)
    xpath = f"//*[@id='tab_txt2img']//span[normalize-space(text())='{TITLE}']/ancestor::div[contains(@class, 'gradio-accordion')][1]"
    section = browser.until(lambda: next((e for e in driver.find_elements("xpath", xpath) if e.is_displayed()), None),
                            timeout, "the Detect-and-Guide section on the txt2img tab")
    label = section.find_element("xpath", f".//span[normalize-space(text())='{TITLE}']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", section)
    label.click()
    browser.until(lambda: section.find_elements("xpath", ".//*[contains(text(), 'Guideline embedding')]")[0].is_displayed(),
                  30, "the section's settings")
    time.sleep(1)
    return section


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "a1111-detect-and-guide.png"))
    a = ap.parse_args(argv)
    webui.setup("a1111")
    with webui.serve("a1111", webui=True) as server:
        driver = browser.start(size="1300,2400")
        try:
            section = open_section(driver, server.url)
            section.screenshot(a.out)
        finally:
            driver.quit()
    print(a.out)


if __name__ == "__main__":
    main()
