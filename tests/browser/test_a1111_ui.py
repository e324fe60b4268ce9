"""The Detect-and-Guide section in the real Automatic1111's txt2img page, in headless Chromium."""

import pytest


@pytest.fixture(scope="module")
def a1111_page(tmp_path_factory):
    from tools import webui

    try:
        webui.setup("a1111")
    except webui.Unavailable as e:
        pytest.skip(str(e))
    with webui.serve("a1111", webui=True, data_dir=str(tmp_path_factory.mktemp("a1111-page"))) as server:
        yield server


def test_the_section_renders_with_every_setting(browser, a1111_page):
    from tools.a1111_screenshot import open_section

    section = open_section(browser, a1111_page.url)
    text = section.text
    for label in ("Guideline embedding", "Safety text", "Mode", "Strength", "Warm-up", "Unsafe region threshold",
                  "Edit threshold", "SLD preset", "SEGA mask", "If detection fails", "Add the detection map"):
        assert label in text, label
    values = [e.get_attribute("value") for e in section.find_elements("css selector", "input")]
    assert "toy-red-circle.safetensors" in values  # the pack's own guideline folder is listed
