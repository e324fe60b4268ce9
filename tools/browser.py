"""Headless Chromium for the browser tests and tours: Debian's chromium + chromedriver driven by
selenium (no browser downloads are possible here), and the few page actions a person does on a
Gradio page (type into a field, click, read, wait, screenshot), addressed by ``elem_id``."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def available() -> bool:
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


def start(profile_dir: str | None = None, size: str = "1400,900"):
    """A headless Chromium (selenium WebDriver); quit() it when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not available():
        raise RuntimeError("Chromium is not installed: `make chromium` installs Debian's chromium and chromium-driver.")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--window-size={size}", f"--user-data-dir={profile_dir or tempfile.mkdtemp(prefix='chromium-')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    return driver


def field(browser, elem_id, timeout: float = 30):
    """The input or textarea inside ``elem_id``, waited for like :func:`click`'s element."""
    return until(lambda: browser.find_element("css selector", f"#{elem_id} input, #{elem_id} textarea"),
                 timeout, f"the field #{elem_id}")


def type_into(browser, elem_id, value):
    """Select all in the field and type ``value``, then Tab (Gradio commits on blur)."""
    from selenium.webdriver.common.keys import Keys

    el = field(browser, elem_id)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    el.click()
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(str(value))
    el.send_keys(Keys.TAB)


def click(browser, elem_id, timeout: float = 30):
    """Click the element once it is on the page: Gradio renders an accordion's or a tab's content only
    after it opens, so a button inside may appear a moment after the click that opened it."""
    el = until(lambda: next((e for e in browser.find_elements("css selector", f"#{elem_id}") if e.is_displayed()), None),
               timeout, f"#{elem_id} on the page")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    el.click()


def text(browser, elem_id) -> str:
    return browser.find_element("css selector", f"#{elem_id}").text


def shown(browser, elem_id) -> bool:
    """Whether the element ``#elem_id`` is on the page and displayed."""
    found = browser.find_elements("css selector", f"#{elem_id}")
    return bool(found) and found[0].is_displayed()


def choose(browser, elem_id, label: str):
    """Pick ``label`` in the Gradio dropdown ``#elem_id`` by typing it and pressing Enter."""
    from selenium.webdriver.common.keys import Keys

    box = field(browser, elem_id)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(label)
    until(lambda: browser.find_elements("css selector", "[role=option]"), 10, f"the options of #{elem_id}")
    box.send_keys(Keys.ENTER)


def until(fn, timeout: float = 180, what: str = ""):
    """``fn()``'s first truthy value, polled while the page re-renders; AssertionError on timeout."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            value = fn()
        except Exception:  # noqa: BLE001 - the page is re-rendering
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def shot(browser, path: str, elem_id: str | None = None) -> str:
    """Save a screenshot of the window to ``path``, scrolled to ``elem_id`` first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if elem_id:
        browser.execute_script("document.getElementById(arguments[0]).scrollIntoView({block: 'center'})", elem_id)
        time.sleep(0.5)
    browser.save_screenshot(path)
    return path
