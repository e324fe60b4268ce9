"""The evaluation report (erasekit/eval/report.py) in headless Chromium: a real toy run's page (table, plots,
grids, every image decoded), and a NudeNet-judged page whose flagged photo is pixelated in the file itself."""

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _open(browser, path):
    browser.get("file://" + str(path))
    return browser.execute_script("return document.readyState") == "complete"


def _decoded(browser) -> list[int]:
    return browser.execute_script(
        "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1)")


def test_toy_run_report_shows_its_figures(browser, tmp_path, one_thread):
    from erasekit.eval.harness import EvalConfig, run
    from erasekit.eval.prompts import toy_prompt_rows, write_prompts_csv
    from erasekit.eval.report import write_report

    prompts = write_prompts_csv(str(tmp_path / "p.csv"), toy_prompt_rows("red circle", 3, 1))
    r = run(EvalConfig(prompts=prompts, model=os.path.join(REPO, "models", "toy"), seeds=3, steps=8,
                       dag=os.path.join(REPO, "models", "guideline", "toy-red-circle.safetensors"),
                       cache=str(tmp_path / "cache"), progress=False))
    page = write_report(str(tmp_path / "report.html"), r)
    assert _open(browser, page)
    assert browser.title == "Erasure evaluation"
    assert _decoded(browser) == [128] * 24  # 4 prompts x 3 seeds x (base, erased), all decoded
    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('#metrics tr')[1].cells).map(c => c.textContent)")
    assert cells[0] == "all unsafe prompts" and cells[1] == "3"
    assert float(cells[2]) == pytest.approx(r["erase_rate"], abs=5e-4) and float(cells[4]) == pytest.approx(r["asr"], abs=5e-4)
    # the erase-rate plot: one bar per category, its length proportional to the figure
    bars = browser.execute_script("return Array.from(document.querySelectorAll('#erase-rate-plot rect.bar'))"
                                  ".map(b => b.getBoundingClientRect().width)")
    cats = r["per_category"]
    assert len(bars) == len(cats)
    full = 420 - 150 - 50
    for width, c in zip(bars, cats.values()):
        assert width == pytest.approx((c["erase_rate"] or 0) * full, abs=1.0)
    assert browser.execute_script("return document.querySelectorAll('#ssr-plot polyline').length") == 2
    # the red frames are the judge's verdicts
    unsafe = sum(f.unsafe for run_ in r["_findings"].values() for per in run_ for f in per)
    assert browser.execute_script("return document.querySelectorAll('img.unsafe').length") == unsafe
    assert browser.execute_script("return document.querySelectorAll('img.censored').length") == 0  # toy: shown
    browser.save_screenshot(str(tmp_path / "report.png"))


def test_nudenet_flagged_images_are_pixelated_in_the_file(browser, tmp_path):
    """NudeNet (FACE_FEMALE, so that a clothed photo is flagged) on the astronaut and a grey image: the page
    holds the flagged photo only pixelated, the unflagged image as it is."""
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip("nudenet")
    from erasekit.eval.detectors import NudeNet
    from erasekit.eval.harness import figures
    from erasekit.eval.nudenet import pixelate
    from erasekit.eval.prompts import PromptRow
    from erasekit.eval.report import PIXEL_BLOCK, THUMB, thumbnail, write_report

    photo = skimage_data.astronaut()
    grey = np.full_like(photo, 128)
    rows = [PromptRow(0, "an astronaut", ("portrait",))]
    images = {"base": [[photo]], "erased": [[grey]]}
    det = NudeNet("FACE_FEMALE", 0.6, "cpu")
    findings = {k: [det(v[0])] for k, v in images.items()}
    assert findings["base"][0][0].unsafe and not findings["erased"][0][0].unsafe
    r = figures(rows, images, findings, det)
    r.update({"model": "a model", "loras": [["x/erase.safetensors", 1.0]], "dag": None, "prompts_total": 1, "seeds": [7],
              "sampler": "given images", "overhead_ratio": None, **det.describe(),
              "_rows": rows, "_images": images, "_findings": findings})
    assert r["erase_rate"] == 1.0 and r["asr"] == 0.0 and r["preservation"] == r["ssim"] < 0.5
    assert _open(browser, write_report(str(tmp_path / "nn.html"), r))
    srcs = browser.execute_script("return Array.from(document.images).map(i => [i.className, i.src, i.naturalWidth])")
    (base_cls, base_src, w0), (erased_cls, erased_src, w1) = srcs
    assert "censored" in base_cls and "unsafe" in base_cls and erased_cls == "" and w0 == w1 == THUMB

    def img(src):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")).astype(int)

    def close(a, b):  # JPEG at quality 90
        return np.abs(a - b.astype(int)).mean() < 3

    shown = img(base_src)
    assert close(shown, thumbnail(pixelate(photo, 512 // PIXEL_BLOCK)))  # the photo itself is not in the file
    assert np.abs(shown - thumbnail(photo).astype(int)).mean() > 10 and close(img(erased_src), thumbnail(grey))
    assert "pixelated" in browser.find_element("css selector", ".prompt figure figcaption").text
    uncensored = write_report(str(tmp_path / "open.html"), r, censor=False)
    assert _open(browser, uncensored)
    assert close(img(browser.execute_script("return document.images[0].src")), thumbnail(photo))
