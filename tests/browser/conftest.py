"""Real browser tests: Debian's headless Chromium driven by selenium + chromedriver (no browser
downloads are possible here; tools/browser.py). Skipped with a reason when Chromium is not
installed; `make test` installs it."""

import pytest

from tools import browser as chromium


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    if not chromium.available():
        pytest.skip("Chromium is not installed (make test installs Debian's chromium and chromium-driver)")
    driver = chromium.start(str(tmp_path_factory.mktemp("chromium")))
    yield driver
    driver.quit()
