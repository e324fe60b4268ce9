"""Detect-and-Guide in the real Automatic1111 (``scripts/erasekit_dag.py``) over its HTTP API."""

import os

import numpy as np
import pytest

SCRIPT = "detect-and-guide (erasekit)"
BASE = {"prompt": "a red circle", "negative_prompt": "", "seed": 1, "steps": 4, "width": 64, "height": 64,
        "batch_size": 2, "cfg_scale": 5.0, "sampler_name": "Euler a"}


@pytest.fixture(scope="module")
def guidelines(a1111):
    """Guideline embeddings in the web UI's models/guideline: one that never detects (its gate is out of
    the random model's reach), one for another model's width, one that detects part of every image."""
    import torch

    from erasekit.dag.guideline import GuidelineEmbedding

    folder = os.path.join(a1111.data_dir, "models", "guideline")
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    GuidelineEmbedding(torch.randn(2, 32), torch.randn(32), "red circle", "sd_v1", gate=0.9999).save(
        os.path.join(folder, "never.safetensors"))
    GuidelineEmbedding(torch.randn(2, 768), torch.randn(768), "nudity", "sd_v1").save(
        os.path.join(folder, "sd15-width.safetensors"))
    # one long token against a zero sink: each pixel's attention mass on it is near 0 or 1, so the floor (0.5)
    # leaves part of the image and the region is detected in both images of the batch (found by trying scales)
    torch.manual_seed(0)
    GuidelineEmbedding(torch.randn(1, 32) * 10, torch.zeros(32), "red circle", "sd_v1", gate=0.55, floor=0.5).save(
        os.path.join(folder, "always.safetensors"))
    return folder


def _args(guideline, mode="DAG", failure="stop", show_map=False, enabled=True):
    return {SCRIPT: {"args": [enabled, guideline, "", mode, 1.0, 0.1, 0.5, 0.01, "medium", 0.0, failure, show_map]}}


def _arrays(images):
    return [np.asarray(i.convert("RGB")) for i in images]


def test_the_section_is_an_always_on_script(a1111):
    assert SCRIPT in a1111.scripts()["txt2img"] + a1111.scripts()["img2img"]


@pytest.mark.parametrize("sampler", ["Euler a", "Heun", "DDIM", "PLMS", "UniPC"])  # k-diffusion (x0; Heun: 2 calls a step), noise
def test_nothing_detected_is_bit_identical_to_the_extension_off(a1111, guidelines, sampler):
    """With the detection map asked for, the two maps that follow the images show that detection ran."""
    payload = dict(BASE, sampler_name=sampler)
    off = _arrays(a1111.txt2img(payload))
    on = _arrays(a1111.txt2img(dict(payload, alwayson_scripts=_args("never.safetensors", show_map=True))))
    assert len(off) == 2 and len(on) == 4
    assert all(np.array_equal(a, b) for a, b in zip(off, on[:2]))


def test_a_detection_guides_every_detected_image(a1111, guidelines):
    """A detected region gets the safety pass: both images of the batch change (where, within the
    region, is DagSession's and guidance.py's rule, tested step by step in the core and in ComfyUI)."""
    payload = dict(BASE, width=128, height=128, steps=6)
    off = _arrays(a1111.txt2img(payload))
    on = _arrays(a1111.txt2img(dict(payload, alwayson_scripts=_args("always.safetensors", show_map=True))))
    assert len(on) == 4 and all(not np.array_equal(a, b) for a, b in zip(off, on[:2]))


def test_and_prompts_map_each_image_over_its_prompts(a1111, guidelines):
    """With AND, CFGDenoiser stacks several prompt rows per image: nothing detected stays bit-identical and a
    detection guides both images (each image's map is the mean over its prompts)."""
    payload = dict(BASE, prompt="a red circle AND a blue square", width=128, height=128, steps=6)
    off = _arrays(a1111.txt2img(payload))
    never = _arrays(a1111.txt2img(dict(payload, alwayson_scripts=_args("never.safetensors", show_map=True))))
    always = _arrays(a1111.txt2img(dict(payload, alwayson_scripts=_args("always.safetensors"))))
    assert len(never) == 4 and all(np.array_equal(a, b) for a, b in zip(off, never[:2]))
    assert len(always) == 2 and all(not np.array_equal(a, b) for a, b in zip(off, always))


def test_sld_mode_runs_through_the_callbacks_and_changes_the_images(a1111, guidelines):
    off = _arrays(a1111.txt2img(BASE))
    sld = _arrays(a1111.txt2img(dict(BASE, alwayson_scripts=_args("never.safetensors", mode="SLD"))))
    assert len(sld) == 2 and not all(np.array_equal(a, b) for a, b in zip(off, sld))


def test_an_embedding_for_another_model_withholds_the_images_with_a_sentence(a1111, guidelines):
    res = a1111.post("/sdapi/v1/txt2img", dict(BASE, alwayson_scripts=_args("sd15-width.safetensors")))
    assert res["images"] == []  # fail closed: nothing sampled unguided is returned
    assert "has width 768 (made for sd_v1), but this model's text width is 32" in res["info"]


def test_the_settings_are_in_the_infotext_and_read_back(a1111, guidelines):
    """Every setting is in the image's infotext, and PNG Info parses it back (what Send to txt2img uses)."""
    import json

    res = a1111.post("/sdapi/v1/txt2img", dict(BASE, batch_size=1, alwayson_scripts=_args("never.safetensors")))
    info = json.loads(res["info"])["infotexts"][0]
    for text in ("DAG guideline: never.safetensors", "DAG mode: DAG", "DAG strength: 1.0", "DAG if detection fails: stop"):
        assert text in info
    png = a1111.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + res["images"][0].split(",", 1)[-1]})
    assert png["info"] == info
    assert png["parameters"]["DAG guideline"] == "never.safetensors" and png["parameters"]["DAG mode"] == "DAG"
