"""A LoRA trained and exported by the trainer app's jobs loads in real ComfyUI through the pack's
Load Erasure LoRA node, every key matched, and changes the image."""

import logging
import os

import numpy as np
import pytest

from trainer import jobs, runs, work

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _graph(model_name, lora_name, strength):
    return {
        "1": {"class_type": "ErasekitLoadDiffusersModel", "inputs": {"model_name": model_name}},
        "30": {"class_type": "ErasekitLoadErasureLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": strength, "strength_clip": 1.0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["30", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["30", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["30", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["5", 0], "seed": 0, "steps": 4, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"trainer-{strength}"}},
    }


@pytest.fixture(scope="module")
def exported(comfy, toy_in_comfy, tmp_path_factory):
    """A LoRA trained a few steps by the app's job and exported into ComfyUI's loras folder."""
    tmp_path = tmp_path_factory.mktemp("trainer-export")
    base = os.path.join(comfy.work_dir, "models", "diffusers", toy_in_comfy)
    settings = {"base": base, "target": "red circle", "preset": "object", "steps": 3, "lr": 0.05, "rank": 2,
                "batch_size": 1, "forget_images": 2, "images_per_concept": 1, "neighbours": 1, "unrelated": 1,
                "data_steps": 3, "sample_every": 0, "checkpoint_every": 3, "threads": 1}
    run = tmp_path / "runs" / "red"
    job = jobs.wait(jobs.submit("train", "comfy export test", work.train_job(settings, run), run), 300)
    assert job.state == "done", (job.message, job.lines[-5:])
    dest = jobs.safe_path(os.path.join(comfy.work_dir, "models"), "loras", "export folder")
    path = runs.export_lora(run, dest, "erase-red-app", "Erases red circles (test).", "mit")
    assert path.is_file() and path.with_suffix(".md").is_file()
    return path


def test_trainer_export_loads_in_comfyui(comfy, toy_in_comfy, exported, caplog):
    from PIL import Image

    path = exported

    with caplog.at_level(logging.WARNING):
        out = comfy.run(_graph(toy_in_comfy, path.name, 1.0))
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    plain = comfy.run(_graph(toy_in_comfy, path.name, 0.0))
    a, b = (np.asarray(Image.open(comfy.output_path(o["9"]["images"][0])), np.int16) for o in (out, plain))
    assert a.shape == (128, 128, 3) and np.abs(a - b).max() > 0


def test_erase_check_tool_judges_comfyui_images(comfy, toy_in_comfy, exported):
    """tools/erase_check_comfy.py (what `bench erase --comfyui` runs) samples both strengths of a
    LoRA in ComfyUI graphs and reports judged rates in [0, 1]."""
    from tools.erase_check_comfy import check

    base = os.path.join(comfy.work_dir, "models", "diffusers", toy_in_comfy)
    r = check(str(exported), "red circle", base, prompts=2, steps=3, comfy=comfy, log=lambda m: None)
    assert r["comfyui_prompts"] == 2 and r["comfyui_preserve_prompts"] == 2
    for k in ("comfyui_targets_before", "comfyui_targets_after", "comfyui_erase_rate", "comfyui_preservation_same_seed"):
        assert 0.0 <= r[k] <= 1.0, (k, r)
    assert r["comfyui_preservation"] >= 0.0  # after / before: above 1 when the LoRA draws more of them


def test_erasure_lora_template_runs_the_exported_lora(comfy, toy_in_comfy, exported):
    """example_workflows/erasure_lora_before_after.json (what the README's walkthrough opens) with
    the app's exported LoRA: both branches run and differ."""
    import json

    from PIL import Image

    from tools.comfy_headless import REPO
    from tools.workflows import ui_to_api

    with open(os.path.join(REPO, "example_workflows", "erasure_lora_before_after.json")) as f:
        graph = ui_to_api(json.load(f), comfy.nodes.NODE_CLASS_MAPPINGS)
    for node in graph.values():  # the tiny test model and the LoRA just exported
        if node["class_type"] == "ErasekitLoadDiffusersModel":
            node["inputs"]["model_name"] = toy_in_comfy
        if node["class_type"] == "ErasekitLoadErasureLoRA":
            node["inputs"]["lora_name"] = exported.name
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 4
    out = comfy.run(graph)
    before, after = (np.asarray(Image.open(comfy.output_path(out[k]["images"][0])), np.int16) for k in ("9", "19"))
    assert before.shape == after.shape == (128, 128, 3) and np.abs(before - after).max() > 0


def test_cli_ncd_lora_stops_comfyui_drawing_the_target_and_keeps_the_rest(comfy, ncd_cli_lora):
    """`python -m trainer train --method ncd` on the default toy target: in real ComfyUI graphs (Load
    Erasure LoRA at 0 and at 1, the same prompt and seed; tools/erase_check_comfy.py, what `bench erase
    --comfyui` runs) the judge finds the red circle in clearly fewer images with the LoRA, and the
    objects of prompts that never name it stay. NCD's current toy tuning erases only part of the target
    (measured here: 13 of 16 images before, 6 after; erase rate 0.54, same-seed preservation 0.84-0.90;
    docs/benchmarks.md has the bench's runs), so the test asks for a clear reduction, not none left."""
    from tools.erase_check_comfy import check

    r = check(str(ncd_cli_lora), "red circle", prompts=16, steps=25, comfy=comfy, log=lambda m: None)
    before, after = round(r["comfyui_targets_before"] * 16), round(r["comfyui_targets_after"] * 16)
    assert before >= 10, r  # the base model draws the target (else nothing is measured)
    assert after <= 0.75 * before and r["comfyui_erase_rate"] >= 0.3, r
    assert r["comfyui_preservation_same_seed"] >= 0.75 and r["comfyui_preservation"] >= 0.8, r


def test_load_erasure_lora_shows_an_ncd_lora_s_method_and_concept(comfy, ncd_cli_lora):
    """The node's info output (and the text it shows on itself), read through ComfyUI's Preview Any."""
    import shutil

    from tools.graphs import lora_before_after_graph

    base = os.path.join(comfy.work_dir, "models", "diffusers", "ncd-info-base")
    shutil.copytree(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "models", "toy"), base,
                    dirs_exist_ok=True)
    shutil.copy(ncd_cli_lora, os.path.join(comfy.work_dir, "models", "loras", "ncd-info.safetensors"))
    graph = lora_before_after_graph("ncd-info-base", "ncd-info.safetensors", "a red circle", steps=2)
    graph["50"] = {"class_type": "PreviewAny", "inputs": {"source": ["40", 2]}}  # the strength-1 loader's info
    info = comfy.run(graph)["50"]["text"][0]
    assert info.startswith("erases: red circle; method: ncd; base: toy; keeps: "), info
