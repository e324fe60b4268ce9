"""Single-file SD checkpoints (written in the original LDM layout with ComfyUI's own key maps)
load through erasekit.models with a local config folder, and compute what the modules did."""

import pytest
import torch

from erasekit import checkpoints, models, tiny
from tools.comfy_headless import from_pack


def _open_clip(text_encoder) -> dict:
    """A transformers CLIP text encoder's weights in OpenCLIP's layout (SD2, SDXL's second
    encoder), through ComfyUI's own converter."""
    import comfy.diffusers_convert

    sd = {"transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
          for k, v in text_encoder.state_dict().items() if not k.startswith("text_projection")}
    if hasattr(text_encoder, "text_projection"):
        sd["transformer.text_projection.weight"] = text_encoder.text_projection.weight
    out = comfy.diffusers_convert.convert_text_enc_state_dict_v20(sd)
    return {k[len("transformer."):] if k.startswith("transformer.") and not k.startswith("transformer.resblocks") else k: v
            for k, v in out.items()}


def write_single_file(parts: dict, layout: str, path: str) -> None:
    """The tiny model as an original (LDM) single-file checkpoint, keys from ComfyUI's maps."""
    import comfy.diffusers_convert
    import comfy.utils

    comfy_unet_config = from_pack("nodes.comfy_bridge", 'comfy_unet_config')

    key_map = comfy.utils.unet_to_diffusers(comfy_unet_config(dict(parts["unet"].config)))
    sd = {"model.diffusion_model." + key_map[k]: v for k, v in parts["unet"].state_dict().items()}
    vae = comfy.diffusers_convert.convert_vae_state_dict(parts["vae"].state_dict())
    sd |= {"first_stage_model." + k: v for k, v in vae.items()}
    te = parts["text_encoder"].state_dict()
    if layout == "sd_v1":
        sd |= {"cond_stage_model.transformer.text_model." + k: v for k, v in te.items()}
    elif layout == "sd_v2":
        sd |= {"cond_stage_model.model." + k: v for k, v in _open_clip(parts["text_encoder"]).items()}
    else:
        sd |= {"conditioner.embedders.0.transformer.text_model." + k: v for k, v in te.items()}
        sd |= {"conditioner.embedders.1.model." + k: v for k, v in _open_clip(parts["text_encoder_2"]).items()}
    checkpoints.save_file_atomic(sd, path)


@pytest.mark.parametrize("layout", tiny.LAYOUTS)
def test_single_file_loads_offline_and_matches(tmp_path, comfy, sd1_tokenizer, layout):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    p = tiny.build(layout, seed=7)
    common = dict(vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=sd1_tokenizer, unet=p["unet"],
                  scheduler=p["scheduler"])
    if layout == "sdxl":
        pipe = StableDiffusionXLPipeline(**common, text_encoder_2=p["text_encoder_2"], tokenizer_2=sd1_tokenizer)
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "config")  # configs + tokenizers: what a user keeps beside a checkpoint
    path = tmp_path / f"tiny-{layout}.safetensors"
    write_single_file(p, layout, str(path))

    comps = models.load(str(path), config=str(tmp_path / "config"))
    assert comps.architecture.name == {"sd_v1": "sd_v1", "sd_v2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[layout]
    x = torch.randn(1, 4, 8, 8)
    c = torch.randn(1, 5, p["unet"].config.cross_attention_dim)
    extra = {}
    if layout == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, tiny.TINY_WIDTH_2), "time_ids": torch.randn(1, 6)}}
    ids = sd1_tokenizer("a red circle", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(comps.unet(x, 3, c, **extra).sample, p["unet"](x, 3, c, **extra).sample, atol=1e-5)
        for mine, ref in zip(comps.text_encoders, [p["text_encoder"], p.get("text_encoder_2")]):
            assert torch.allclose(mine(ids, output_hidden_states=True).hidden_states[-1],
                                  ref(ids, output_hidden_states=True).hidden_states[-1], atol=1e-4)
        assert torch.allclose(comps.vae.decode(x).sample, p["vae"].decode(x).sample, atol=1e-5)


def test_diffusers_folder_loads_with_its_architecture(tmp_path, comfy, sd1_tokenizer):
    from erasekit.tiny import save_sd1_folder

    p = save_sd1_folder(str(tmp_path / "tiny"), sd1_tokenizer, seed=2)
    comps = models.load(str(tmp_path / "tiny"))
    assert comps.architecture.name == "sd_v1" and comps.tokenizer is not None
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 5, tiny.TINY_WIDTH)
    with torch.no_grad():
        assert torch.allclose(comps.unet(x, 3, c).sample, p["unet"](x, 3, c).sample, atol=1e-5)
