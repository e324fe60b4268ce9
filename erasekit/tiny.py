"""Randomly initialised tiny models with the *layouts* of real Stable Diffusion releases.

No real weights can be downloaded where this project is built and tested, yet every code path
that reads real checkpoints must be exercised. These models keep each release's structure
(block types, attention placement, linear vs conv projections, one vs two text encoders, the
SDXL time/text conditioning) and shrink only the widths, so a few MB in memory go through the
same conversion, loading and patching code as the real multi-GB files. Built at test time from
a seed, never stored.
"""

from __future__ import annotations

LAYOUTS = ("sd_v1", "sd_v2", "sdxl")
TINY_WIDTH = 32  # text width of the (first) tiny text encoder
TINY_WIDTH_2 = 48  # SDXL's second encoder: wider than the first, as in SDXL (768 vs 1280), so
#                    loaders that tell the two apart by width (diffusers' single-file code) can


def unet_config(layout: str) -> dict:
    """A ``UNet2DConditionModel`` config with the block structure of ``layout``, tiny widths."""
    if layout == "sd_v1":  # SD1.5: 4 levels, attention at the top 3, conv proj_in, 8 heads
        return dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=TINY_WIDTH, attention_head_dim=2,
        )
    if layout == "sd_v2":  # SD2.x: same levels, linear proj_in, head width fixed (64 in SD2)
        cfg = unet_config("sd_v1")
        cfg.update(attention_head_dim=(1, 1, 2, 2), use_linear_projection=True, cross_attention_dim=TINY_WIDTH)
        cfg["attention_head_dim"] = 2  # ComfyUI's UNetModel needs one head count for all levels
        return cfg
    if layout == "sdxl":  # SDXL: 3 levels, no attention at the top, 2/10 transformer layers (here 1/2)
        return dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=2,
            use_linear_projection=True, cross_attention_dim=TINY_WIDTH + TINY_WIDTH_2,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TINY_WIDTH_2,
        )
    raise ValueError(f"unknown layout '{layout}'; expected one of {LAYOUTS}")


def text_encoder_config(vocab_size: int = 49408, width: int = TINY_WIDTH, projection: bool = False):
    """A tiny ``CLIPTextConfig`` (SD's encoders are CLIP text transformers)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=width if projection else 512,
    )


def build(layout: str, seed: int = 0) -> dict:
    """Tiny diffusers/transformers modules of ``layout``: unet, text_encoder(s), vae, scheduler."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    parts = {"unet": UNet2DConditionModel(**unet_config(layout)).eval()}
    parts["text_encoder"] = CLIPTextModel(text_encoder_config()).eval()
    if layout == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection(
            text_encoder_config(width=TINY_WIDTH_2, projection=True)).eval()
    parts["vae"] = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
    ).eval()
    parts["scheduler"] = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if layout == "sd_v2" else "epsilon", steps_offset=1,
    )
    return parts


def save_sd1_folder(folder: str, tokenizer, seed: int = 0) -> dict:
    """A tiny SD1-layout diffusers folder (random weights, a real CLIP tokenizer) written to ``folder``,
    for loader and graph tests; returns :func:`build`'s parts."""
    from diffusers import StableDiffusionPipeline

    p = build("sd_v1", seed)
    pipe = StableDiffusionPipeline(vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=tokenizer, unet=p["unet"],
                                   scheduler=p["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return p


def toy_components(seed: int = 0):
    """The toy model's architecture at tiny size, random (``Components``, as ``models.load`` returns): the
    training engine's and the methods' tests run on it in seconds."""
    from . import models
    from .toyworld.model import build_toy_pipeline

    pipe = build_toy_pipeline(seed, tiny=True)
    return models.from_modules(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.scheduler)
