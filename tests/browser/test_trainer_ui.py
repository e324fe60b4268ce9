"""The trainer app where people meet it: headless Chromium clicks through data -> train -> check ->
export on a tiny random toy model and checks what a person sees (progress text, the loss plot,
previews, the judge's counts, the exported file's path). Screenshots: out/screenshots/trainer-*.png."""

import os
import re
import time

import pytest
import torch

from tools.browser import choose, click, field, shot, shown, text, type_into, until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCREENSHOTS = os.path.join(REPO, "out", "screenshots")


def _serve(tmp, base):
    """The trainer page on ``base``, one torch thread, runs under ``tmp/runs``: yields (url, runs folder)."""
    from trainer.app import TrainerApp

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    demo = TrainerApp(tmp / "runs", base=str(base), threads=1).build()
    demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url, tmp / "runs"
    finally:
        demo.close()
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trainer_url(tmp_path_factory):
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    tmp = tmp_path_factory.mktemp("trainer-ui")
    save_toy_pipeline(build_toy_pipeline(0, tiny=True), tmp / "toy")
    yield from _serve(tmp, tmp / "toy")


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


@pytest.fixture(scope="module")
def toy_trainer_url(tmp_path_factory):
    """The page on the bundled toy model: NCD keeps only the tuples whose pictures the judge confirms
    (three of the concept, one redrawn without it), which a random model does not draw."""
    from trainer.runner import DEFAULT_BASE

    yield from _serve(tmp_path_factory.mktemp("trainer-ui-ncd"), DEFAULT_BASE)


def test_ncd_from_the_page_data_train_check_export(browser, toy_trainer_url):
    """NCD chosen in the method list: Generate data makes its tuples (a safe picture and three of the
    concept per prompt, counted as drawn), a reload shows them again, Start trains NCD, Check judges
    the same seeds before / after, Export writes a LoRA whose metadata names NCD and the concept."""
    from safetensors import safe_open

    url, root = toy_trainer_url
    browser.get(url)
    until(lambda: text(browser, "job-status").strip(), 90, "the page")

    browser.find_element("xpath", "//*[@id='advanced']//*[contains(text(), 'Advanced settings')]").click()
    assert not shown(browser, "ncd-settings")
    choose(browser, "f-method", "NCD")
    until(lambda: shown(browser, "ncd-settings") and not shown(browser, "resalign-settings"), 30, "NCD's settings row")
    assert field(browser, "f-method").get_attribute("value").startswith("NCD")
    from erasekit.erase.methods import get

    lr = get("ncd").preset("object", toy=True)[0]["lr"]
    until(lambda: float(field(browser, "f-lr").get_attribute("value")) == lr, 30, "NCD's toy learning rate")

    # 3. Data, the cheapest the page allows NCD on the toy model: 2 tuples, 1 preserve image each of 2
    # concepts, 10 sampling steps (fewer and the judge confirms no tuple's safe picture)
    for elem_id, value in (("f-run_name", "ncd-ui-run"), ("f-forget_images", 2), ("f-images_per_concept", 1),
                           ("f-neighbours", 1), ("f-unrelated", 1), ("f-data_steps", 10)):
        type_into(browser, elem_id, value)
    click(browser, "generate-data")
    until(lambda: re.search(r"images \d+(\.\d)?/10\b", text(browser, "data-summary")), 120,
          "the tuples' images done / total (2 x (1 + 3) + 2 preserve images)")
    summary = until(lambda: "tuples of 'red circle'" in text(browser, "data-summary") and text(browser, "data-summary"),
                    240, "NCD's data summary")
    assert summary.startswith("2 tuples of 'red circle' (a safe picture and 3 of the concept each)"), summary
    assert "forget images" not in summary  # not INPO's sets
    until(lambda: len(browser.find_elements("css selector", "#data-gallery img")) >= 8, 30, "the tuples' pictures")
    html = browser.find_element("id", "data-gallery").get_attribute("innerHTML")
    assert "safe: a green circle" in html and "concept 1/3: a red circle" in html, html[:400]
    _shot(browser, "ncd-data", "data-gallery")

    browser.get(url)  # a reload: the run's NCD data from its folder
    until(lambda: text(browser, "job-status").strip(), 90, "the page after a reload")
    type_into(browser, "f-run_name", "ncd-ui-run")
    until(lambda: "2 tuples of 'red circle'" in text(browser, "data-summary"), 30, "NCD's data after a reload")
    assert until(lambda: browser.find_elements("css selector", "#data-gallery img"), 30, "the gallery after a reload")
    browser.find_element("xpath", "//*[@id='advanced']//*[contains(text(), 'Advanced settings')]").click()
    choose(browser, "f-method", "NCD")
    until(lambda: shown(browser, "ncd-settings"), 30, "NCD's settings row after the reload")

    # 4. Train: 8 steps, a preview at 4 and 8, on the data just made (not drawn again)
    type_into(browser, "f-steps", 8)
    for elem_id, value in (("f-sample_every", 4), ("f-sample_steps", 2), ("f-checkpoint_every", 4)):
        type_into(browser, elem_id, value)
    for elem_id, value in (("f-forget_images", 2), ("f-images_per_concept", 1), ("f-neighbours", 1),
                           ("f-unrelated", 1), ("f-data_steps", 10)):  # the reload put the defaults back
        type_into(browser, elem_id, value)
    click(browser, "start")
    until(lambda: "Running: training 'red circle' in ncd-ui-run" in text(browser, "job-status")
          and "/8" in text(browser, "job-status"), 240, "the running status with its step")
    until(lambda: "Done: training" in text(browser, "job-status"), 300, "the end of training")
    time.sleep(1.5)  # one more tick for the log
    assert "erase-red-circle-ncd.safetensors" in text(browser, "job-status")
    log = until(lambda: "step 8/8" in field(browser, "log").get_attribute("value")
                and field(browser, "log").get_attribute("value"), 20, "the log's last step")
    assert "--method ncd" in log and "2 tuples, 2 preserve images from" in log
    assert "draws of" not in log  # the tuples of Generate data, read from the run, not drawn again
    assert "implicit_acc" in log and "sigma_r0" in log
    assert until(lambda: browser.find_elements("css selector", "#loss-plot canvas, #loss-plot svg"), 20, "the loss plot")
    # NCD's own signal, not INPO's Delta S: its implicit accuracy and sigma(r_0), with the 0.5 line
    until(lambda: "implicit accuracy" in browser.find_element("id", "signal-plot").get_attribute("innerHTML")
          and "<path" in browser.find_element("id", "signal-plot").get_attribute("innerHTML"), 30, "NCD's signal")
    note = text(browser, "signal-note")
    assert "implicit accuracy climbing to 1" in note and "Last step: implicit accuracy" in note and "Delta S" not in note
    _shot(browser, "ncd-trained", "loss-plot")

    # 5. Check: 2 seeds, 10 sampling steps; the judge's counts of each prompt before / after
    type_into(browser, "check-seeds", 2)
    type_into(browser, "check-steps", 10)
    click(browser, "check")
    until(lambda: browser.find_elements("css selector", "#check-grid img"), 240, "the before/after grid")
    counts = until(lambda: "unrelated" in text(browser, "check-counts") and text(browser, "check-counts"), 30,
                   "the judge's counts")
    assert "red circle" in counts and "neighbour" in counts
    assert re.search(r"target.*red circle.*\d/2.*\d/2", counts.replace("\n", " ")), counts
    _shot(browser, "ncd-check", "check-grid")

    # 6. Export: the file's metadata names the method and the concept (what Load Erasure LoRA shows)
    type_into(browser, "lora-name", "ncd-ui-erasure")
    click(browser, "export")
    path = until(lambda: field(browser, "export-path").get_attribute("value"), 60, "the exported path")
    assert path.endswith("ncd-ui-erasure.safetensors") and os.path.isfile(path) and str(root.resolve()) in path
    assert "Load Erasure LoRA" in text(browser, "export-msg")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["erasekit.method"] == "ncd" and meta["erasekit.erased_concept"] == "red circle"
    _shot(browser, "ncd-export", "export-msg")


def _edit_cell(browser, elem_id: str, row: int, col: int, value):
    """Double-click a Dataframe cell, type ``value`` over it and press Enter (how a person edits the table)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    selector = f"#{elem_id} [data-testid='cell-{row}-{col}']"
    cell = until(lambda: browser.find_element("css selector", selector), 30, f"the cell {row},{col} of #{elem_id}")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
    ActionChains(browser).double_click(cell).perform()
    box = until(lambda: browser.find_element("css selector", f"{selector} textarea, {selector} input"), 10, "the cell's editor")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value))
    box.send_keys(Keys.ENTER)
    until(lambda: browser.find_element("css selector", selector).text.split("\n")[0].strip() == str(value), 10,
          "the edited cell")  # (a selected cell also shows its menu button, a line of its own)


def test_resalign_from_the_page_pool_table_refusal_and_a_short_run(browser, toy_trainer_url):
    """ResAlign chosen in the method list: its settings row and the pool table show (the built-in pool);
    Load pool file fills the table from a one-row pool file; a row edited to steps 0 is refused under
    Start in one sentence and nothing starts; steps 3 trains 2 outer steps (J 1, K 1) on the bundled
    toy model; the run keeps the edited row in its pool.toml; the signal plot draws harm before / after
    the simulated fine-tune and its note counts the divergence guard."""
    from erasekit.erase.resalign import DEFAULT_POOL, InnerConfig, read_pool, write_pool

    url, root = toy_trainer_url
    write_pool(root / "one-row.toml", [InnerConfig("sgd", 0.01, 2, "lora", "plain", 1)])
    browser.get(url)
    until(lambda: text(browser, "job-status").strip(), 90, "the page")

    browser.find_element("xpath", "//*[@id='advanced']//*[contains(text(), 'Advanced settings')]").click()
    assert not shown(browser, "resalign-settings")
    choose(browser, "f-method", "ResAlign")
    until(lambda: shown(browser, "resalign-settings") and shown(browser, "f-pool") and not shown(browser, "ncd-settings"), 30,
          "ResAlign's settings row and its pool table")
    table = text(browser, "f-pool")
    assert all(c in table for c in ("optimizer", "lr", "steps", "space", "loss", "batch"))
    assert len(browser.find_elements("css selector", "#f-pool [data-testid^='cell-'][data-testid$='-0']")) == len(DEFAULT_POOL)

    type_into(browser, "pool-file", "one-row.toml")
    click(browser, "load-pool")
    until(lambda: "1 simulated fine-tune of" in text(browser, "pool-msg"), 30, "the pool file's rows in the table")
    until(lambda: not browser.find_elements("css selector", "#f-pool [data-testid='cell-1-0']"), 10, "one row left")
    _shot(browser, "resalign-pool", "resalign-settings")

    # the cheapest run: 2 forget images, 1 preserve image each of 2 concepts, 3 sampling steps; 2 outer steps
    for elem_id, value in (("f-run_name", "resalign-ui-run"), ("f-forget_images", 2), ("f-images_per_concept", 1),
                           ("f-neighbours", 1), ("f-unrelated", 1), ("f-data_steps", 3), ("f-steps", 2),
                           ("f-sample_every", 0), ("f-checkpoint_every", 2), ("f-iterations", 1), ("f-configs", 1)):
        type_into(browser, elem_id, value)
    _edit_cell(browser, "f-pool", 0, 2, 0)  # steps 0: refused
    click(browser, "start")
    refused = until(lambda: "Error" in text(browser, "action") and text(browser, "action"), 60, "the refusal under Start")
    assert "ResAlign pool table" in refused and "row 1, has steps = 0" in refused and "--" not in refused, refused
    assert not (root / "resalign-ui-run").exists()  # nothing started

    _edit_cell(browser, "f-pool", 0, 2, 3)
    click(browser, "start")
    until(lambda: "Running: training 'red circle' in resalign-ui-run" in text(browser, "job-status"), 120,
          "the running status")
    until(lambda: "Done: training" in text(browser, "job-status"), 600, "the end of training")
    time.sleep(1.5)  # one more tick for the log and the plots
    assert "erase-red-circle-resalign.safetensors" in text(browser, "job-status")
    pool = read_pool(str(root / "resalign-ui-run" / "pool.toml"))
    assert pool == [InnerConfig("sgd", 0.01, 3, "lora", "plain", 1)]  # the edited row, as the run used it
    log = until(lambda: "step 2/2" in field(browser, "log").get_attribute("value")
                and field(browser, "log").get_attribute("value"), 20, "the log's last step")
    assert "--method resalign" in log and f"--pool {root.resolve() / 'resalign-ui-run' / 'pool.toml'}" in log
    assert "harm_star" in log and "guard" in log and "hyper_norm" in log

    def drawn(elem_id, *words):
        html = browser.find_element("id", elem_id).get_attribute("innerHTML")
        return all(w in html for w in words) and "<path" in html

    until(lambda: drawn("signal-plot", "harm now", "harm after a simulated fine-tune"), 30, "harm before / after")
    note = text(browser, "signal-note")
    assert "Erased looks like both lines falling" in note and "Outer step 2: harm" in note
    assert "divergence guard stepped in" in note and "Delta S" not in note
    _shot(browser, "resalign-trained", "signal-plot")
