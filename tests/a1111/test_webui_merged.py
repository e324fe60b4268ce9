"""A checkpoint merged by ``python -m trainer merge`` (erasekit/merge.py) in the real Automatic1111: it is
listed, loads, and draws what the base checkpoint with the same LoRA as ``<lora:name:1>`` draws.

The base is the tiny SD1 LDM checkpoint the ``a1111`` fixture serves (built with A1111's own ``ldm``
classes: model_channels 32, 32-wide text, SD1's block counts); the merge reads it through diffusers with a
config folder of those widths, written here from the shipped SD1 configs.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

BASE = {"prompt": "a red circle", "negative_prompt": "", "seed": 5, "steps": 4, "width": 64, "height": 64,
        "batch_size": 1, "cfg_scale": 5.0, "sampler_name": "Euler a"}
LORA, MERGED = "erase-merge-check", "erasekit-merge-check"


def _config_folder(folder: str, clip_dir: str) -> str:
    """The shipped SD1 configs with the tiny A1111 checkpoint's widths (see tools/webui_models.py)."""
    from erasekit import models

    shutil.copytree(os.path.join(models.CONFIGS_DIR, "sd_v1"), folder)
    for f in ("vocab.json", "merges.txt"):  # outside models/configs the tokenizer needs its own vocabulary
        shutil.copy(os.path.join(models.CLIP_BPE_DIR, f), os.path.join(folder, "tokenizer"))
    for part, changes in (("unet", {"block_out_channels": [32, 64, 128, 128], "cross_attention_dim": 32}),
                          ("vae", {"block_out_channels": [32, 64, 128, 128]})):
        path = os.path.join(folder, part, "config.json")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg | changes, f)
    shutil.copy(os.path.join(clip_dir, "config.json"), os.path.join(folder, "text_encoder", "config.json"))
    return folder


@pytest.fixture(scope="module")
def merged(a1111, tmp_path_factory):
    import torch

    from erasekit import checkpoints, lora_io
    from erasekit.merge import merge_checkpoint
    from tools import webui

    ckpt = webui.model("a1111")
    config = _config_folder(str(tmp_path_factory.mktemp("cfg") / "tiny-a1111"), os.path.splitext(ckpt)[0] + "-clip")
    shapes, _ = checkpoints.read_header(ckpt)
    gen = torch.Generator().manual_seed(4)
    lora = {}
    for module, key in (("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                         "input_blocks.4.1.transformer_blocks.0.attn2.to_k"),
                        ("unet.up_blocks.2.attentions.1.transformer_blocks.0.ff.net.2",
                         "output_blocks.7.1.transformer_blocks.0.ff.net.2"),
                        ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
                         "middle_block.1.transformer_blocks.0.attn2.to_v"),
                        ("text_encoder.text_model.encoder.layers.1.self_attn.v_proj", None)):
        out, inp = shapes["model.diffusion_model." + key + ".weight"] if key else (32, 32)
        lora[module] = lora_io.LoraWeights(torch.randn(4, inp, generator=gen) * 0.5,
                                           torch.randn(out, 4, generator=gen) * 0.5, 2.0)
    lora_path = os.path.join(a1111.data_dir, "models", "Lora", LORA + ".safetensors")
    os.makedirs(os.path.dirname(lora_path), exist_ok=True)
    lora_io.save_lora(lora, lora_path, checkpoints.sd_v1(32), erased_concept="red circle", method="inpo",
                      model_card=False)
    folder = os.path.join(a1111.data_dir, "models", "Stable-diffusion")
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, MERGED + ".safetensors")
    result = merge_checkpoint(ckpt, out, lora=lora_path, model_config=config)
    shutil.copy(os.path.splitext(ckpt)[0] + ".yaml", os.path.join(folder, MERGED + ".yaml"))  # its tiny CLIP config
    a1111.post("/sdapi/v1/refresh-loras", {})
    a1111.post("/sdapi/v1/refresh-checkpoints", {})
    return result


def test_a1111_draws_the_merged_checkpoint_as_base_plus_lora(a1111, merged):
    import numpy as np
    from test_webui_lora import _image

    assert merged.unet_changed == 3 and merged.text_changed == 1
    assert MERGED in {m["model_name"] for m in a1111.get("/sdapi/v1/sd-models")}
    plain = _image(a1111.post("/sdapi/v1/txt2img", BASE))
    with_lora = _image(a1111.post("/sdapi/v1/txt2img", dict(BASE, prompt=BASE["prompt"] + f"<lora:{LORA}:1>")))
    res = a1111.post("/sdapi/v1/txt2img", dict(BASE, override_settings={"sd_model_checkpoint": MERGED},
                                               override_settings_restore_afterwards=True))
    assert json.loads(res["info"])["sd_model_name"] == MERGED, a1111.log_tail()
    image = _image(res)
    changed, diff = int(np.abs(with_lora - plain).max()), int(np.abs(with_lora - image).max())
    print(f"A1111: LoRA vs none {changed}/255; <lora> vs the merged checkpoint {diff}/255")
    assert changed > 20 and diff <= 1
