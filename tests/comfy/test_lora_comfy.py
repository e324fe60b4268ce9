"""An exported kohya LoRA in real ComfyUI and in diffusers does what the peft LoRA did."""

import copy
import logging

import pytest
import torch

from erasekit import lora_io
from erasekit.bench.lora import diffusers_outputs, export_case, reference_outputs, roundtrip_case, roundtrip_inputs


@pytest.fixture(scope="module")
def case():
    """Random peft LoRAs on the tiny SD1 UNet (attention, 1x1 and 3x3 convs; lora_alpha != r,
    alpha and rank patterns) and text encoder, with the peft outputs as reference."""
    c = roundtrip_case(seed=0)
    c["reference"] = reference_outputs(c, roundtrip_inputs(seed=0))
    return c


def test_comfyui_loads_the_kohya_lora_with_every_key(comfy, case, tmp_path, caplog):
    from tools.lora_roundtrip_comfy import comfy_lora_outputs

    path = export_case(case, str(tmp_path))
    lora, _ = lora_io.load_lora(path)
    with caplog.at_level(logging.WARNING):
        out = comfy_lora_outputs(path, seed=0)
    assert out["unloaded"] == [] and not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert out["modules"] == len(lora) > 100
    ref = case["reference"]
    # the merged diffusers weights give the peft outputs, and so does ComfyUI
    merged = copy.deepcopy(case["base"]["unet"])
    lora_io.apply_lora(merged, lora)
    inputs = roundtrip_inputs(seed=0)
    with torch.no_grad():
        merged_out = merged(inputs["x"], inputs["t"], encoder_hidden_states=inputs["ctx"]).sample
    assert (merged_out - ref["unet"]).abs().max() < 1e-4
    assert (out["unet"] - merged_out).abs().max() < 1e-3
    assert (out["text"] - ref["text"]).abs().max() < 1e-3
    with torch.no_grad():  # and the LoRA does change the outputs a lot
        base = case["base"]["unet"](inputs["x"], inputs["t"], encoder_hidden_states=inputs["ctx"]).sample
    assert (base - ref["unet"]).abs().max() > 0.05


@pytest.mark.parametrize("save_format", ["kohya", "peft"])
def test_diffusers_load_lora_weights_matches_peft(case, tmp_path, save_format):
    path = export_case(case, str(tmp_path), save_format)
    out = diffusers_outputs(path, seed=0)
    assert (out["unet"] - case["reference"]["unet"]).abs().max() < 1e-3
    assert (out["text"] - case["reference"]["text"]).abs().max() < 1e-3
