"""A kohya LoRA on the tiny SD1 model in real ComfyUI: outputs and unloaded keys.

    python -m tools.lora_roundtrip_comfy LORA.safetensors --seed 0 --out outputs.safetensors

Builds the tiny SD1 model of ``erasekit.tiny`` (same seed, same weights as the exporter's
base), puts the UNet into ComfyUI (``comfy_bridge.load_diffusers_unet``) and the text encoder
into ComfyUI's own SD1 CLIP (``comfy.sd1_clip`` with the tiny widths), loads the LoRA with
``comfy.sd.load_lora_for_models`` and runs both on ``erasekit.bench.lora.roundtrip_inputs``.
Prints one JSON line; the output tensors go to ``--out``. Used by ``erasekit.bench.lora`` (in
a subprocess) and by tests/comfy/test_lora_comfy.py (in-process, :func:`comfy_lora_outputs`).
"""

from __future__ import annotations

import argparse
import json
import logging

from tools.comfy_headless import from_pack


def comfy_sd1_clip(text_encoder):
    """ComfyUI's own SD1 CLIP (``clip_l``) with the widths of ``text_encoder`` and its weights."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import torch

    cfg = text_encoder.config
    shape = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "hidden_act", "max_position_embeddings")}
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "clip_l_model_config": shape})
    sd = {}
    for k, v in text_encoder.state_dict().items():  # transformers 5 CLIPTextModel has no text_model. prefix
        sd["clip_l.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    missing, _ = clip.load_sd(sd, full_model=True)
    missing = [k for k in missing if "text_projection" not in k and "logit_scale" not in k]
    if missing:
        raise RuntimeError(f"tiny text encoder does not fit ComfyUI's CLIP: missing {missing[:3]}")
    return clip


class _LoraWarnings(logging.Handler):
    """Collects ComfyUI's 'lora key not loaded' / 'NOT LOADED' warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith(("lora key not loaded", "NOT LOADED")):
            self.keys.append(msg)


def comfy_lora_outputs(lora_path: str, seed: int = 0) -> dict:
    """ComfyUI must already be importable (HeadlessComfy started). Returns ``unet`` [2, 4, 8, 8],
    ``text`` [1, 77, 32], ``unloaded`` (ComfyUI's warnings) and ``modules`` (LoRA modules in the file)."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import torch

    load_diffusers_unet = from_pack("nodes.comfy_bridge", 'load_diffusers_unet')
    from erasekit import tiny
    from erasekit.bench.lora import roundtrip_inputs

    parts = tiny.build("sd_v1", seed)
    model = load_diffusers_unet(parts["unet"], parts["scheduler"])
    clip = comfy_sd1_clip(parts["text_encoder"])
    lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
    warnings = _LoraWarnings()
    logging.getLogger().addHandler(warnings)
    try:
        model_l, clip_l = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(warnings)
    inputs = roundtrip_inputs(seed)
    try:
        comfy.model_management.load_models_gpu([model_l])
        with torch.no_grad():
            unet = model_l.model.diffusion_model(inputs["x"], timesteps=inputs["t"], context=inputs["ctx"])
            tokens = {"l": [[(int(i), 1.0) for i in inputs["ids"][0]]]}
            text = clip_l.encode_from_tokens(tokens)
    finally:
        comfy.model_management.unload_all_models()  # patched weights stay in place until then
    return {"unet": unet.float().cpu(), "text": text.float().cpu(), "unloaded": warnings.keys,
            "modules": sum(k.endswith(".lora_down.weight") for k in lora)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lora")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="safetensors file for the unet/text outputs")
    a = ap.parse_args(argv)
    import tempfile

    from tools.comfy_headless import HeadlessComfy

    HeadlessComfy(tempfile.mkdtemp(prefix="erasekit-lora-comfy-"))
    out = comfy_lora_outputs(a.lora, a.seed)
    import safetensors.torch

    safetensors.torch.save_file({"unet": out["unet"].contiguous(), "text": out["text"].contiguous()}, a.out)
    print(json.dumps({"unloaded": out["unloaded"], "modules": out["modules"], "out": a.out}))


if __name__ == "__main__":
    main()
