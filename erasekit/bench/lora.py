"""lora-roundtrip benchmark: does an exported kohya LoRA do in ComfyUI and diffusers what it did in peft?

A tiny SD1-layout model (:mod:`erasekit.tiny`) gets random peft LoRAs with ``lora_alpha != r``,
an ``alpha_pattern``, a ``rank_pattern``, 3x3 conv LoRAs (resnet ``conv1``), 1x1 conv LoRAs
(``proj_in``) and text-encoder LoRAs. They are exported with :func:`erasekit.lora_io.save_lora`,
then loaded by
- real ComfyUI (``comfy.sd.load_lora_for_models``), in a subprocess running
  ``tools/lora_roundtrip_comfy.py`` since ``erasekit/`` never imports ComfyUI;
- diffusers (``StableDiffusionPipeline.load_lora_weights`` on the kohya file);
and their UNet / text-encoder outputs are compared with the peft model's. Figures are max
absolute differences (float32, CPU).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile

from . import REPO

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def add_random_lora(model, target_modules, seed: int = 0, r: int = 4, lora_alpha: float = 8.0, **config):
    """Inject a peft LoRA (``model.add_adapter``) and fill its weights with random values, in place."""
    import torch
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def roundtrip_case(seed: int = 0) -> dict:
    """Tiny SD1 parts: ``base`` (plain modules) and ``peft`` (deep copies with random LoRAs)."""
    from .. import tiny

    base = tiny.build("sd_v1", seed)
    unet = add_random_lora(copy.deepcopy(base["unet"]), UNET_TARGETS, seed + 1,
                           alpha_pattern={"to_k": 2.0}, rank_pattern={"conv1": 2})
    te = add_random_lora(copy.deepcopy(base["text_encoder"]), TE_TARGETS, seed + 2, r=2, lora_alpha=3.0)
    return {"base": base, "unet": unet, "text_encoder": te}


def roundtrip_inputs(seed: int = 0) -> dict:
    """UNet inputs x [2, 4, 8, 8], t [2], ctx [2, 7, 32] and 77 token ids [1, 77] for the text encoder."""
    import torch

    from .. import tiny

    gen = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(0, 49406, (1, 77), generator=gen)
    ids[0, 0], ids[0, 10:] = 49406, 49407  # start, end, end-padding, as CLIP prompts are
    return {"x": torch.randn(2, 4, 8, 8, generator=gen), "t": torch.tensor([500.0, 20.0]),
            "ctx": torch.randn(2, 7, tiny.TINY_WIDTH, generator=gen), "ids": ids}


def reference_outputs(case: dict, inputs: dict) -> dict:
    """The peft models' outputs: ``unet`` [2, 4, 8, 8], ``text`` [1, 77, 32]."""
    import torch

    with torch.no_grad():
        unet = case["unet"](inputs["x"], inputs["t"], encoder_hidden_states=inputs["ctx"]).sample
        text = case["text_encoder"](inputs["ids"]).last_hidden_state
    return {"unet": unet, "text": text}


def export_case(case: dict, folder: str, save_format: str = "kohya") -> str:
    """Export the case's LoRAs (kohya file or peft folder); returns the weights file's path."""
    from .. import checkpoints, lora_io, tiny

    lora = lora_io.lora_from_peft(unet=case["unet"], text_encoder=case["text_encoder"])
    name = "roundtrip.safetensors" if save_format == "kohya" else "roundtrip"
    return lora_io.save_lora(lora, os.path.join(folder, name), checkpoints.sd_v1(tiny.TINY_WIDTH),
                             save_format=save_format, erased_concept="random", method="bench", model_card=False)


def diffusers_outputs(lora_path: str, seed: int = 0) -> dict:
    """UNet and text-encoder outputs of a StableDiffusionPipeline after ``load_lora_weights(lora file)``."""
    import torch
    from diffusers import StableDiffusionPipeline

    from .. import tiny

    p = tiny.build("sd_v1", seed)
    pipe = StableDiffusionPipeline(vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=None, unet=p["unet"],
                                   scheduler=p["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(os.path.dirname(lora_path), weight_name=os.path.basename(lora_path))
    inputs = roundtrip_inputs(seed)
    with torch.no_grad():
        unet = pipe.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["ctx"]).sample
        text = pipe.text_encoder(inputs["ids"]).last_hidden_state
    return {"unet": unet, "text": text}


def comfy_outputs_subprocess(lora_path: str, seed: int, out_file: str) -> dict:
    """Run tools/lora_roundtrip_comfy.py; returns its JSON and the outputs it saved."""
    import safetensors.torch

    from ..fresh_process import json_from

    report = json_from(["-m", "tools.lora_roundtrip_comfy", os.path.abspath(lora_path), "--seed", str(seed),
                        "--out", os.path.abspath(out_file)], "the ComfyUI round trip", timeout=600, cwd=REPO)
    return {**report, **safetensors.torch.load_file(out_file)}


def bench_lora_roundtrip(seed: int = 0) -> dict:
    case = roundtrip_case(seed)
    inputs = roundtrip_inputs(seed)
    ref = reference_outputs(case, inputs)
    with tempfile.TemporaryDirectory(prefix="erasekit-lora-") as tmp:
        path = export_case(case, tmp)
        comfy = comfy_outputs_subprocess(path, seed, os.path.join(tmp, "comfy_out.safetensors"))
        diff = diffusers_outputs(path, seed)

    def max_diff(a, b):
        return round(float((a - b).abs().max()), 8)

    return {
        "bench": "lora-roundtrip",
        "modules": comfy["modules"],
        "unloaded_keys_comfyui": len(comfy["unloaded"]),
        "max_abs_diff_comfyui": max(max_diff(comfy["unet"], ref["unet"]), max_diff(comfy["text"], ref["text"])),
        "max_abs_diff_diffusers": max(max_diff(diff["unet"], ref["unet"]), max_diff(diff["text"], ref["text"])),
        "max_abs_diff_comfyui_unet": max_diff(comfy["unet"], ref["unet"]),
        "max_abs_diff_diffusers_text": max_diff(diff["text"], ref["text"]),
        "output_scale": round(float(ref["unet"].abs().max()), 4),
    }


if __name__ == "__main__":
    print(json.dumps(bench_lora_roundtrip()))
