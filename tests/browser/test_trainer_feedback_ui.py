"""The trainer page for a first-time user, in headless Chromium on a tiny random toy model: progress
with a rate and the time left under the step's own button, a step's error next to its button and
gone for a later visitor, a reload showing the run's data from its folder, buttons that can act only
when they can, help under the settings, the strength presets, and the warning for nudity on the toy
model. Screenshots: out/screenshots/trainer-feedback-*.png."""

import os
import re
import time

import pytest
import torch

from tools.browser import choose, click, field, shot, shown, text, type_into, until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCREENSHOTS = os.path.join(REPO, "out", "screenshots")
RATE = re.compile(r"(\d+\.\d (images|steps)/s|\d+\.\d s/(image|step))")


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline
    from trainer.app import TrainerApp

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("trainer-feedback-ui")
    save_toy_pipeline(build_toy_pipeline(0, tiny=True), tmp / "toy")
    demo = TrainerApp(tmp / "runs", base=str(tmp / "toy"), threads=1).build()
    demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()
        torch.set_num_threads(n)


def _open(browser, url):
    browser.get(url)
    until(lambda: text(browser, "job-status").strip(), 90, "the page")


def _disabled(browser, elem_id) -> bool:
    return browser.find_element("css selector", f"#{elem_id}").get_attribute("disabled") is not None


def test_data_progress_then_a_reload_shows_the_runs_data(browser, page_url):
    _open(browser, page_url)
    until(lambda: all(_disabled(browser, b) for b in ("resume", "stop", "check", "export")), 30,
          "Resume, Stop, Check and Export disabled: no checkpoint, nothing running, nothing trained")
    assert not _disabled(browser, "start") and not _disabled(browser, "generate-data")
    # the default run name: what a reloaded page shows again. Enough images for the progress to be seen
    for elem_id, value in (("f-forget_images", 16), ("f-images_per_concept", 4), ("f-neighbours", 2),
                           ("f-unrelated", 2), ("f-data_steps", 25)):
        type_into(browser, elem_id, value)
    click(browser, "generate-data")
    line = until(lambda: RATE.search(text(browser, "data-summary")) and "left" in text(browser, "data-summary")
                 and text(browser, "data-summary"), 120, "images done / total with a rate and the time left")
    assert re.search(r"images \d+/32", line), line  # 16 forget + (2 + 2) x 4 preserve images
    assert "Running: data" in text(browser, "job-status") and not _disabled(browser, "stop")
    assert text(browser, "action") == ""  # the data step's progress is not under Start
    shot(browser, os.path.join(SCREENSHOTS, "trainer-feedback-progress.png"), "data-summary")
    until(lambda: "forget images of 'red circle'" in text(browser, "data-summary"), 300, "the data summary")
    until(lambda: browser.find_elements("css selector", "#data-gallery img"), 30, "the gallery")
    assert "mask outlined" in browser.find_element("id", "data-gallery").get_attribute("innerHTML")

    _open(browser, page_url)  # a reload: the run's data is in its folder
    assert until(lambda: browser.find_elements("css selector", "#data-gallery img"), 30, "the gallery after a reload")
    assert "forget images of 'red circle'" in text(browser, "data-summary")
    assert text(browser, "job-status").startswith("No job running")  # the ended job is no news
    shot(browser, os.path.join(SCREENSHOTS, "trainer-feedback-reload.png"), "data-gallery")


def test_a_steps_error_is_under_its_button_and_gone_for_a_later_visitor(browser, page_url):
    _open(browser, page_url)
    type_into(browser, "f-run_name", "blob-ui")
    type_into(browser, "f-target", "red blob")
    for elem_id, value in (("f-forget_images", 2), ("f-images_per_concept", 1), ("f-data_steps", 2)):
        type_into(browser, elem_id, value)
    click(browser, "generate-data")
    error = until(lambda: "Error" in text(browser, "data-summary") and text(browser, "data-summary"), 120,
                  "the data step's error")
    assert "Cannot erase 'red blob'" in error and "--" not in error and "python -m" not in error
    assert "Error" not in text(browser, "action")  # not under Start
    shot(browser, os.path.join(SCREENSHOTS, "trainer-feedback-error.png"), "data-summary")

    _open(browser, page_url)  # a later visitor, on the same run
    type_into(browser, "f-run_name", "blob-ui")
    time.sleep(3)  # three ticks of the page's 1-second poll on this run
    assert "Error" not in text(browser, "job-status") and "Error" not in text(browser, "data-summary")
    assert "Error" not in text(browser, "action")


def test_help_presets_and_the_toy_models_nudity_warning(browser, page_url):
    _open(browser, page_url)
    browser.find_element("xpath", "//*[@id='advanced']//*[contains(text(), 'Advanced settings')]").click()
    until(lambda: "Erasure strength" in text(browser, "advanced"), 30, "eta's help")
    advanced = text(browser, "advanced")
    assert "protected (lambda_prior)" in advanced and "counts as erased (tau, the margin)" in advanced
    steps = int(float(field(browser, "f-steps").get_attribute("value")))
    lam = float(field(browser, "f-lambda_prior").get_attribute("value"))
    browser.find_element("xpath", "//*[@id='strength']//label[contains(., 'strong')]").click()
    until(lambda: int(float(field(browser, "f-steps").get_attribute("value"))) == round(steps * 1.5), 30,
          "Steps at the strong preset")
    assert float(field(browser, "f-lambda_prior").get_attribute("value")) < lam

    browser.find_element("xpath", "//*[@id='f-concept_type']//label[contains(., 'nudity')]").click()
    note = until(lambda: text(browser, "concept-note"), 30, "the warning for nudity on the toy model")
    assert "toy model draws no people" in note and "Stable Diffusion checkpoint" in note
    shot(browser, os.path.join(SCREENSHOTS, "trainer-feedback-nudity.png"), "concept-note")
    browser.find_element("xpath", "//*[@id='f-concept_type']//label[contains(., 'object')]").click()
    until(lambda: not text(browser, "concept-note").strip(), 30, "the warning gone for an object")


def test_each_method_shows_its_own_settings(browser, page_url):
    """NCD's and ResAlign's settings (each with its own beta) appear with their method only, with help under them."""
    _open(browser, page_url)
    click(browser, "advanced")  # the accordion holding the methods' settings

    assert not shown(browser, "ncd-settings") and not shown(browser, "resalign-settings")  # INPO, the default
    choose(browser, "f-method", "NCD")
    until(lambda: shown(browser, "ncd-settings") and not shown(browser, "resalign-settings"), 30, "NCD's settings alone")
    assert "reward" in text(browser, "ncd-settings").lower() or "beta" in text(browser, "ncd-settings").lower()
    from erasekit.erase.methods import get

    toy_beta = get("ncd").preset("object", toy=True)[1]["beta"]  # the page's base is the toy model: its tuning
    assert float(field(browser, "f-beta").get_attribute("value")) == toy_beta
    choose(browser, "f-method", "ResAlign")
    until(lambda: shown(browser, "resalign-settings") and not shown(browser, "ncd-settings"), 30, "ResAlign's settings alone")
    assert field(browser, "f-resalign_beta").get_attribute("value") == "0.8"
    assert "Harden this LoRA" in text(browser, "resalign-settings")
    assert "ResAlign harm loss" in text(browser, "resalign-settings") and "trains on NCD's tuples" in text(browser, "resalign-settings")
    shot(browser, os.path.join(SCREENSHOTS, "trainer-feedback-resalign.png"), "resalign-settings")
