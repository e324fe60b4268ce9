"""The trainer app where people meet it: headless Chromium clicks through data -> train -> check ->
export on a tiny random toy model and checks what a person sees (progress text, the loss plot,
previews, the judge's counts, the exported file's path). Screenshots: out/screenshots/trainer-*.png."""

import os
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCREENSHOTS = os.path.join(REPO, "out", "screenshots")


@pytest.fixture(scope="module")
def trainer_url(tmp_path_factory):
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline
    from trainer.app import TrainerApp

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("trainer-ui")
    save_toy_pipeline(build_toy_pipeline(0, tiny=True), tmp / "toy")
    demo = TrainerApp(tmp / "runs", base=str(tmp / "toy"), threads=1).build()
    demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url, tmp / "runs"
    finally:
        demo.close()
        torch.set_num_threads(n)


def _field(browser, elem_id):
    return browser.find_element("css selector", f"#{elem_id} input, #{elem_id} textarea")


def _type(browser, elem_id, value):
    from selenium.webdriver.common.keys import Keys

    el = _field(browser, elem_id)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    el.click()
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(str(value))
    el.send_keys(Keys.TAB)


def _click(browser, elem_id):
    el = browser.find_element("css selector", f"#{elem_id}")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    el.click()


def _text(browser, elem_id):
    return browser.find_element("css selector", f"#{elem_id}").text


def _until(fn, timeout=180, what=""):
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


def _shot(browser, name, elem_id=None):
    os.makedirs(SCREENSHOTS, exist_ok=True)
    if elem_id:
        browser.execute_script("document.getElementById(arguments[0]).scrollIntoView({block: 'center'})", elem_id)
        time.sleep(0.5)
    browser.save_screenshot(os.path.join(SCREENSHOTS, f"trainer-{name}.png"))


def test_click_through_data_train_check_export(browser, trainer_url):
    url, root = trainer_url
    browser.get(url)
    _until(lambda: _text(browser, "job-status").strip(), 90, "the page")  # jobs of other tests may show
    assert "Erasekit toy model" in _text(browser, "arch")
    _shot(browser, "start")

    # 3. Data: two forget images, one image each of two preserved concepts, 3 sampling steps
    for elem_id, value in (("f-run_name", "ui-run"), ("f-forget_images", 2), ("f-images_per_concept", 1),
                           ("f-neighbours", 1), ("f-unrelated", 1), ("f-data_steps", 3)):
        _type(browser, elem_id, value)
    _click(browser, "generate-data")
    summary = _until(lambda: "forget images of 'red circle'" in _text(browser, "data-summary")
                     and _text(browser, "data-summary"), what="the data summary")
    assert "preserve images" in summary
    _until(lambda: browser.find_elements("css selector", "#data-gallery img"), 30, "the gallery's images")
    _shot(browser, "data", "data-gallery")

    # 4. Train: 40 steps, previews every 20, in the advanced settings
    _type(browser, "f-steps", 40)
    browser.find_element("xpath", "//*[@id='advanced']//*[contains(text(), 'Advanced settings')]").click()
    for elem_id, value in (("f-lr", 0.01), ("f-rank", 2), ("f-sample_every", 20), ("f-sample_steps", 2),
                           ("f-checkpoint_every", 20)):
        _type(browser, elem_id, value)
    assert "Rough time" in _text(browser, "estimate")
    _click(browser, "start")
    running = _until(lambda: "Running: training 'red circle' in ui-run" in _text(browser, "job-status")
                     and "/40" in _text(browser, "job-status") and _text(browser, "job-status"), 120,
                     "the running status with its step")
    assert " step " in running and "Running: training" in _text(browser, "action")  # also beside the buttons
    _shot(browser, "training", "loss-plot")
    _until(lambda: "Done: training" in _text(browser, "job-status"), 240, "the end of training")
    time.sleep(1.5)  # one more tick for the plot and the preview
    status = _text(browser, "job-status")
    assert "erase-red-circle-inpo.safetensors" in status
    assert browser.find_elements("css selector", "#loss-plot canvas, #loss-plot svg"), "no loss plot drawn"
    assert _until(lambda: browser.find_elements("css selector", "#preview img"), 20, "the preview image")
    assert "step 40/40" in _field(browser, "log").get_attribute("value")
    _shot(browser, "trained", "loss-plot")

    # 5. Check: 2 seeds, 3 sampling steps
    _type(browser, "check-seeds", 2)
    _type(browser, "check-steps", 3)
    _click(browser, "check")
    _until(lambda: browser.find_elements("css selector", "#check-grid img"), 180, "the before/after grid")
    counts = _until(lambda: "neighbour" in _text(browser, "check-counts") and _text(browser, "check-counts"), 30,
                    "the judge's counts")
    assert "target" in counts and "unrelated" in counts
    _shot(browser, "check", "check-grid")

    # 6. Export
    _type(browser, "lora-name", "ui-erasure")
    _click(browser, "export")
    path = _until(lambda: _field(browser, "export-path").get_attribute("value"), 60, "the exported path")
    assert path.endswith("ui-erasure.safetensors") and os.path.isfile(path)
    assert str(root.resolve()) in path and "Load Erasure LoRA" in _text(browser, "export-msg")
    assert "ui-run" in _text(browser, "runs")
    _shot(browser, "export", "export-msg")
