"""The trainer app where people meet it: headless Chromium clicks through data -> train -> check ->
export on a tiny random toy model and checks what a person sees (progress text, the loss plot,
previews, the judge's counts, the exported file's path). Screenshots: out/screenshots/trainer-*.png."""

import os
import re
import time

import pytest
import torch

from tools.browser import click, field, shot, text, type_into, until

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


def _shot(browser, name, elem_id=None):
    shot(browser, os.path.join(SCREENSHOTS, f"trainer-{name}.png"), elem_id)


def test_click_through_data_train_check_export(browser, trainer_url):
    url, root = trainer_url
    browser.get(url)
    until(lambda: text(browser, "job-status").strip(), 90, "the page")  # jobs of other tests may show
    assert "Erasekit toy model" in text(browser, "arch")
    _shot(browser, "start")

    # 3. Data: two forget images, one image each of two preserved concepts, 3 sampling steps
    for elem_id, value in (("f-run_name", "ui-run"), ("f-forget_images", 2), ("f-images_per_concept", 1),
                           ("f-neighbours", 1), ("f-unrelated", 1), ("f-data_steps", 3)):
        type_into(browser, elem_id, value)
    click(browser, "generate-data")
    summary = until(lambda: "forget images of 'red circle'" in text(browser, "data-summary")
                     and text(browser, "data-summary"), what="the data summary")
    assert "preserve images" in summary
    until(lambda: browser.find_elements("css selector", "#data-gallery img"), 30, "the gallery's images")
    _shot(browser, "data", "data-gallery")

    # the review: the first forget image with its mask as a paintable layer in the image editor
    browser.find_element("xpath", "//*[@id='review']//*[contains(text(), 'Review the forget images')]").click()
    click(browser, "review-show")
    until(lambda: text(browser, "review-msg").startswith("Image 1 of"), 60, "the review message")
    assert until(lambda: browser.find_elements("css selector", "#mask-editor canvas"), 30, "the editor's canvas")
    _shot(browser, "review", "mask-editor")

    # 4. Train: 40 steps, previews every 20, in the advanced settings
    type_into(browser, "f-steps", 40)
    browser.find_element("xpath", "//*[@id='advanced']//*[contains(text(), 'Advanced settings')]").click()
    for elem_id, value in (("f-lr", 0.01), ("f-rank", 2), ("f-sample_every", 20), ("f-sample_steps", 2),
                           ("f-checkpoint_every", 20)):
        type_into(browser, elem_id, value)
    assert "Rough time" in text(browser, "estimate") and "a guess" in text(browser, "estimate")  # no run measured yet
    click(browser, "start")
    running = until(lambda: "Running: training 'red circle' in ui-run" in text(browser, "job-status")
                     and "/40" in text(browser, "job-status") and text(browser, "job-status"), 120,
                     "the running status with its step")
    assert " step " in running and "Running: training" in text(browser, "action")  # also beside the buttons
    beside = until(lambda: re.search(r"step \d+/40, \d+\.\d (steps/s|s/step), about \d+ (s|min) left",
                                     text(browser, "action")) and text(browser, "action"), 120,
                   "steps, rate and time left under Start")
    assert "Error" not in beside
    _shot(browser, "training", "loss-plot")
    until(lambda: "Done: training" in text(browser, "job-status"), 240, "the end of training")
    time.sleep(1.5)  # one more tick for the plot and the preview
    status = text(browser, "job-status")
    assert "erase-red-circle-inpo.safetensors" in status
    assert until(lambda: browser.find_elements("css selector", "#loss-plot canvas, #loss-plot svg"), 20, "the loss plot")
    assert until(lambda: browser.find_elements("css selector", "#preview img"), 20, "the preview image")
    assert until(lambda: "step 40/40" in field(browser, "log").get_attribute("value"), 20, "the log's last step")
    # the estimate read the run just made again, without a setting changing
    until(lambda: "measured on the run 'ui-run'" in text(browser, "estimate"), 20, "the estimate after the run")
    _shot(browser, "trained", "loss-plot")

    def drawn(elem_id, *words):  # the plot's SVG (axis titles, legend) once Vega has drawn the last update
        html = browser.find_element("id", elem_id).get_attribute("innerHTML")
        return all(w in html for w in words) and "<path" in html

    until(lambda: drawn("loss-plot", "training step", "loss, smoothed"), 30, "labelled axes and the moving average")
    until(lambda: drawn("signal-plot", "Delta S", "tau (the margin)"), 30, "Delta S with its tau line")
    assert "above the tau line" in text(browser, "signal-note")
    _shot(browser, "trained", "loss-plot")

    # 5. Check: 6 seeds, 10 sampling steps: long enough to watch its progress under its button
    type_into(browser, "check-seeds", 6)
    type_into(browser, "check-steps", 10)
    click(browser, "check")
    until(lambda: re.search(r"images \d+/36", text(browser, "check-msg")), 120, "the check's images done / total")
    until(lambda: browser.find_elements("css selector", "#check-grid img"), 180, "the before/after grid")
    counts = until(lambda: "neighbour" in text(browser, "check-counts") and text(browser, "check-counts"), 30,
                    "the judge's counts")
    assert "target" in counts and "unrelated" in counts
    _shot(browser, "check", "check-grid")

    # 6. Export
    type_into(browser, "lora-name", "ui-erasure")
    click(browser, "export")
    path = until(lambda: field(browser, "export-path").get_attribute("value"), 60, "the exported path")
    assert path.endswith("ui-erasure.safetensors") and os.path.isfile(path)
    assert str(root.resolve()) in path and "Load Erasure LoRA" in text(browser, "export-msg")
    assert "ui-run" in text(browser, "runs")
    _shot(browser, "export", "export-msg")
