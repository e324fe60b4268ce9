"""Erasure LoRAs in the real Automatic1111 (its own ``extensions-builtin/Lora``, ``<lora:name:1>``) and
the extension's check of their base model (``scripts/erasekit_lora.py``), over the HTTP API.

The LoRA is written by :func:`erasekit.lora_io.save_lora` for the tiny SD1 checkpoint the ``a1111``
fixture serves (widths of 32) and exported into the web UI's ``models/Lora`` by the trainer's export
(:func:`trainer.runs.export_lora` with its card). Its modules and the checkpoint's weights they change
are named here independently of both A1111's and Erasekit's name conversions (SD1's layout: down block
b, attention j -> input block 1 + 3b + j; up block b, attention j -> output block 3b + j).
"""

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

SCRIPT = "erasure lora check (erasekit)"
BASE = {"prompt": "a red circle", "negative_prompt": "", "seed": 3, "steps": 4, "width": 64, "height": 64,
        "batch_size": 1, "cfg_scale": 5.0, "sampler_name": "Euler a"}
UNET = "model.diffusion_model."
MODULES = {  # diffusers module -> its weight in the LDM checkpoint
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v": UNET + "input_blocks.5.1.transformer_blocks.0.attn2.to_v",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q": UNET + "middle_block.1.transformer_blocks.0.attn2.to_q",
    "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0":
        UNET + "output_blocks.5.1.transformer_blocks.0.attn2.to_out.0",
    "unet.up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_k": UNET + "output_blocks.9.1.transformer_blocks.0.attn2.to_k",
    "text_encoder.text_model.encoder.layers.1.self_attn.v_proj":
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.v_proj",
}
NAME, SDXL_NAME, MERGED = "erase-red-circle", "erase-sdxl", "erasekit-merged"


def _arrays(images):
    return [np.asarray(i.convert("RGB")).astype(np.int16) for i in images]


def _image(res, i=0):
    """Image ``i`` of a /sdapi/v1/txt2img answer as int16 [H, W, 3]."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(res["images"][i].split(",", 1)[-1]))).convert("RGB")
                      ).astype(np.int16)


@pytest.fixture(scope="module")
def loras(a1111, tmp_path_factory):
    """In the web UI's models/Lora: the erasure LoRA for the tiny model (rank 4, alpha 2, random up and
    down on 5 cross-attention layers and a text-encoder layer), exported there by the trainer with its
    card, and one whose metadata says SDXL (SDXL's widths); in models/Stable-diffusion: the tiny
    checkpoint with the first LoRA merged in (W + alpha/r up @ down), with the tiny model's .yaml."""
    import safetensors.torch
    import torch

    from erasekit import checkpoints, lora_io
    from tools import webui
    from trainer import runs

    ckpt = webui.model("a1111")
    weights = safetensors.torch.load_file(ckpt)
    gen = torch.Generator().manual_seed(0)
    lora = {}
    for module, key in MODULES.items():
        out, inp = weights[key + ".weight"].shape
        lora[module] = lora_io.LoraWeights(torch.randn(4, inp, generator=gen) * 0.5, torch.randn(out, 4, generator=gen) * 0.5,
                                           2.0)
    run = tmp_path_factory.mktemp("run")  # a finished run: its LoRA beside its config
    lora_io.save_lora(lora, str(run / "erase-red-circle-inpo.safetensors"), checkpoints.sd_v1(32),
                      erased_concept="red circle", method="inpo", preserved=["blue square", "green triangle"],
                      base_model="tiny-sd1.safetensors", model_card=False)
    folder = os.path.join(a1111.data_dir, "models", "Lora")
    path = runs.export_lora(run, Path(folder), NAME, description="A test of the web UI's card.",
                            webui_card=True)

    _sdxl_lora(folder)

    merged = dict(weights)
    for module, key in MODULES.items():
        merged[key + ".weight"] = weights[key + ".weight"] + lora[module].delta()
    models = os.path.join(a1111.data_dir, "models", "Stable-diffusion")
    os.makedirs(models, exist_ok=True)
    safetensors.torch.save_file(merged, os.path.join(models, MERGED + ".safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.splitext(ckpt)[0] + ".yaml", os.path.join(models, MERGED + ".yaml"))  # its config and tiny CLIP
    a1111.post("/sdapi/v1/refresh-loras", {})
    a1111.post("/sdapi/v1/refresh-checkpoints", {})
    return {"path": str(path), "folder": folder}


def _sdxl_lora(folder, name=SDXL_NAME, width=2048):
    """An erasure LoRA whose metadata says SDXL in ``folder``: SDXL's widths, or those of ``width``."""
    import torch

    from erasekit import checkpoints, lora_io

    gen = torch.Generator().manual_seed(1)
    sdxl = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
            lora_io.LoraWeights(torch.randn(4, width, generator=gen) * 0.01, torch.randn(640, 4, generator=gen) * 0.01,
                                4.0)}
    os.makedirs(folder, exist_ok=True)
    lora_io.save_lora(sdxl, os.path.join(folder, name + ".safetensors"), checkpoints.sdxl(),
                      erased_concept="red circle", method="inpo", model_card=False)


def test_the_check_is_an_always_on_script(a1111):
    assert SCRIPT in a1111.scripts()["txt2img"] and SCRIPT in a1111.scripts()["img2img"]


def test_an_erasure_lora_applied_by_the_web_ui_equals_the_merged_weights(a1111, loras):
    """Same seed: the tiny model with ``<lora:erase-red-circle:1>`` (A1111 adds the LoRA to the weights)
    and the checkpoint with the LoRA merged in by Erasekit give the same image; without the LoRA it
    differs."""
    plain = _arrays(a1111.txt2img(BASE))[0]
    res = a1111.post("/sdapi/v1/txt2img", dict(BASE, prompt=BASE["prompt"] + f"<lora:{NAME}:1>"))
    with_lora = _image(res)
    info = json.loads(res["info"])
    assert f"Lora hashes: \"{NAME}:" in info["infotexts"][0] or f"Lora hashes: {NAME}:" in info["infotexts"][0], info
    assert "Erasure LoRA warning" not in res["info"]  # made for this model: nothing to say
    merged_res = a1111.post("/sdapi/v1/txt2img", dict(BASE, override_settings={"sd_model_checkpoint": MERGED},
                                                      override_settings_restore_afterwards=True))
    assert json.loads(merged_res["info"])["sd_model_name"] == MERGED  # the override took (A1111 drops an unknown one)
    merged = _image(merged_res)
    changed = int(np.abs(with_lora - plain).max())
    diff = int(np.abs(with_lora - merged).max())
    print(f"LoRA vs no LoRA: max pixel difference {changed}/255 ({(with_lora != plain).mean():.0%} of values); "
          f"LoRA via A1111 vs merged checkpoint: {diff}/255")
    assert changed > 20
    assert diff == 0
    assert json.loads(a1111.post("/sdapi/v1/txt2img", BASE)["info"])["sd_model_name"] != MERGED  # restored


def test_the_lora_tab_lists_it_with_what_it_erases(a1111, loras):
    """``/sdapi/v1/loras`` is the Lora tab's list (``networks.available_networks``) with each file's
    metadata, which the card's metadata view shows; the card's description, SD version and preferred
    weight come from ``<name>.json`` beside the file, A1111's user metadata, written by the export."""
    listed = {x["name"]: x for x in a1111.get("/sdapi/v1/loras")}
    meta = listed[NAME]["metadata"]
    assert listed[NAME]["alias"] == NAME and os.path.samefile(listed[NAME]["path"], loras["path"])
    assert (meta["erasekit.erased_concept"], meta["erasekit.method"], meta["ss_base_model_version"]) == \
           ("red circle", "inpo", "sd_v1")
    assert meta["ss_sd_model_name"] == "tiny-sd1.safetensors"
    with open(os.path.join(loras["folder"], NAME + ".json"), encoding="utf-8") as f:
        card = json.load(f)
    assert card["description"] == ("Erases: red circle. Method: inpo. Base: Stable Diffusion 1.x (tiny-sd1.safetensors). "
                                   "Keeps: blue square, green triangle. A test of the web UI's card.")
    assert (card["sd version"], card["preferred weight"], card["activation text"]) == ("SD1", 1.0, "")
    assert listed[SDXL_NAME]["metadata"]["ss_base_model_version"].startswith("sdxl_")  # A1111 files it under SDXL


def test_an_erasure_lora_for_another_base_model_is_named_in_the_info(a1111, loras):
    res = a1111.post("/sdapi/v1/txt2img", dict(BASE, prompt=BASE["prompt"] + f"<lora:{SDXL_NAME}:1>"))
    assert len(res["images"]) == 1  # a warning, not a refusal
    info = json.loads(res["info"])
    warning = info["extra_generation_params"]["Erasure LoRA warning"]
    assert warning == (f"the erasure LoRA '{SDXL_NAME}' does not erase 'red circle' on this model: '{SDXL_NAME}.safetensors' "
                       "is a LoRA for Stable Diffusion XL, but the model is Stable Diffusion 1.x; pick a LoRA made for "
                       "Stable Diffusion 1.x.")
    assert "Erasure LoRA warning: " in info["infotexts"][0]
    png = a1111.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + res["images"][0].split(",", 1)[-1]})
    assert png["parameters"]["Erasure LoRA warning"] == warning  # kept in the image's infotext


def test_forge_names_an_erasure_lora_for_another_base_model_too(forge):
    """Forge (its own ``sd_forge_lora``, the same ``networks.loaded_networks``) on its full-size SD1.5. The
    LoRA has SD1.5's widths under SDXL's metadata: a real SDXL LoRA stops Forge's sampling with its own
    shape error (HTTP 500, "mat1 and mat2 shapes cannot be multiplied"), the warning then only in its log."""
    _sdxl_lora(os.path.join(forge.data_dir, "models", "Lora"), "erase-sdxl-labelled", width=768)
    forge.post("/sdapi/v1/refresh-loras", {})
    res = forge.post("/sdapi/v1/txt2img", dict(BASE, steps=2, prompt=BASE["prompt"] + "<lora:erase-sdxl-labelled:1>"))
    assert len(res["images"]) == 1, forge.log_tail()
    assert json.loads(res["info"])["extra_generation_params"]["Erasure LoRA warning"] == (
        "the erasure LoRA 'erase-sdxl-labelled' does not erase 'red circle' on this model: 'erase-sdxl-labelled.safetensors' "
        "is a LoRA for Stable Diffusion XL, but the model is Stable Diffusion 1.x; pick a LoRA made for Stable "
        "Diffusion 1.x."), forge.log_tail()
