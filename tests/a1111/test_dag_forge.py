"""Detect-and-Guide in the real Forge (``scripts/erasekit_dag.py``: the ComfyUI patch ``nodes/dag_patch.py`` on
Forge's UNet patcher) over its HTTP API, with a full-size random SD1.5."""

import json
import os

import numpy as np
import pytest

SCRIPT = "detect-and-guide (erasekit)"
BASE = {"prompt": "a red circle", "negative_prompt": "", "seed": 1, "steps": 4, "width": 64, "height": 64,
        "batch_size": 2, "cfg_scale": 5.0, "sampler_name": "Euler a"}


@pytest.fixture(scope="module")
def guidelines(forge):
    """Guideline embeddings in Forge's models/guideline: one that never detects (its gate is out of the random
    model's reach), one for another model's width, one whose detection maps cannot be computed."""
    import torch

    from erasekit.dag.guideline import GuidelineEmbedding

    folder = os.path.join(forge.data_dir, "models", "guideline")
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    GuidelineEmbedding(torch.randn(2, 768), torch.randn(768), "red circle", "sd_v1", gate=0.9999).save(
        os.path.join(folder, "never.safetensors"))
    GuidelineEmbedding(torch.randn(2, 32), torch.randn(32), "nudity", "tiny").save(
        os.path.join(folder, "tiny-width.safetensors"))
    # finite tokens whose keys overflow: every attention score, hence every detection map, is NaN
    GuidelineEmbedding(torch.full((2, 768), 3e38), torch.randn(768), "red circle", "sd_v1").save(
        os.path.join(folder, "overflow.safetensors"))
    return folder


def _args(guideline, mode="DAG", failure="stop", show_map=False, enabled=True):
    return {SCRIPT: {"args": [enabled, guideline, "", mode, 1.0, 0.1, 0.5, 0.01, "medium", 0.0, failure, show_map]}}


def _arrays(images):
    return [np.asarray(i.convert("RGB")) for i in images]


def test_the_section_is_an_always_on_script(forge):
    assert SCRIPT in forge.scripts()["txt2img"] + forge.scripts()["img2img"]


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM"])  # k-diffusion and Forge's timestep samplers
def test_nothing_detected_is_bit_identical_to_the_extension_off(forge, guidelines, sampler):
    """With the detection map asked for, the two maps that follow the images show that the patch read CAMs
    and detected at every step (a map comes from the session's detections only)."""
    payload = dict(BASE, sampler_name=sampler)
    off = _arrays(forge.txt2img(payload))
    on = _arrays(forge.txt2img(dict(payload, alwayson_scripts=_args("never.safetensors", show_map=True))))
    assert len(off) == 2 and len(on) == 4, forge.log_tail()
    assert all(np.array_equal(a, b) for a, b in zip(off, on[:2]))
    assert "Detect-and-Guide stopped" not in forge.log_tail(10**6)


def test_sld_mode_runs_through_the_patch_and_changes_the_images(forge, guidelines):
    off = _arrays(forge.txt2img(BASE))
    sld = _arrays(forge.txt2img(dict(BASE, alwayson_scripts=_args("never.safetensors", mode="SLD"))))
    assert len(sld) == 2 and not all(np.array_equal(a, b) for a, b in zip(off, sld)), forge.log_tail()


def test_an_embedding_for_another_model_withholds_the_images_with_a_sentence(forge, guidelines):
    res = forge.post("/sdapi/v1/txt2img", dict(BASE, alwayson_scripts=_args("tiny-width.safetensors")))
    assert res["images"] == []  # fail closed: nothing sampled unguided is returned
    info = json.loads(res["info"])
    assert "has width 32 (made for tiny), but this model's text width is 768" in info["extra_generation_params"][
        "Detect-and-Guide stopped"]
    # the next generation is not held back by the last one's failure
    assert len(forge.txt2img(dict(BASE, alwayson_scripts=_args("never.safetensors")))) == 2


def test_the_hires_fix_pass_is_a_sampling_of_its_own(forge, guidelines):
    """Forge puts its UNet patcher back before each sampling: the hires fix pass gets a fresh patch (nothing
    detected: bit-identical; its detection map comes back). At a Hires CFG Scale of 1 Forge skips the
    unconditional prediction DAG needs: the images are withheld with the sentence."""
    hires = dict(BASE, batch_size=1, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5,
                 hr_upscaler="Latent", hr_additional_modules=["Use same choices"], hr_cfg=5.0)
    off = _arrays(forge.txt2img(hires))
    on = _arrays(forge.txt2img(dict(hires, alwayson_scripts=_args("never.safetensors", show_map=True))))
    assert len(off) == 1 and len(on) == 2 and off[0].shape == on[1].shape == (96, 96, 3), forge.log_tail()
    assert np.array_equal(off[0], on[0])
    res = forge.post("/sdapi/v1/txt2img", dict(hires, hr_cfg=1.0, alwayson_scripts=_args("never.safetensors")))
    assert res["images"] == []
    assert "Forge skips at a CFG scale of 1" in json.loads(res["info"])["extra_generation_params"]["Detect-and-Guide stopped"]


def test_a_detection_map_that_cannot_be_computed_stops_or_guides_the_image_whole(forge, guidelines):
    """An error inside Forge's sampler (the patch's post-CFG function) would only fail the request: the patch
    hands it to the script, which withholds the images with the sentence; "guide whole image" goes on."""
    res = forge.post("/sdapi/v1/txt2img", dict(BASE, alwayson_scripts=_args("overflow.safetensors")))
    assert res["images"] == []
    stopped = json.loads(res["info"])["extra_generation_params"]["Detect-and-Guide stopped"]
    assert "could not compute the detection map of image(s) [0, 1]" in stopped
    off = _arrays(forge.txt2img(BASE))
    whole = _arrays(forge.txt2img(dict(BASE, alwayson_scripts=_args("overflow.safetensors", failure="guide whole image"))))
    assert len(whole) == 2 and all(not np.array_equal(a, b) for a, b in zip(off, whole)), forge.log_tail()


def test_the_settings_are_in_the_infotext_and_read_back(forge, guidelines):
    """Every setting is in the image's infotext, and PNG Info parses it back (what Send to txt2img uses)."""
    res = forge.post("/sdapi/v1/txt2img", dict(BASE, batch_size=1, alwayson_scripts=_args("never.safetensors")))
    info = json.loads(res["info"])["infotexts"][0]
    for text in ("DAG guideline: never.safetensors", "DAG mode: DAG", "DAG strength: 1.0", "DAG if detection fails: stop"):
        assert text in info
    png = forge.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + res["images"][0].split(",", 1)[-1]})
    assert png["info"] == info
    assert png["parameters"]["DAG guideline"] == "never.safetensors" and png["parameters"]["DAG mode"] == "DAG"
