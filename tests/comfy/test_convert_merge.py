"""Converted and merged files in real ComfyUI.

- An LDM-keyed single-file checkpoint, written with ComfyUI's own key maps (so not with the inverse this
  project derives from diffusers' converter), converts into a LoRA that reproduces its fine-tuned weights.
- A merged single-file checkpoint loads through ComfyUI's CheckpointLoaderSimple and its UNet computes what
  the base with the LoRA applied computes; its keys are the ones ComfyUI itself writes for an SD1 checkpoint
  (CheckpointSave's ``state_dict_for_saving``), which are the LDM module names A1111 loads.

ComfyUI recognises a checkpoint by its release's widths (SD1.5: 320 channels, 768-wide text), so the tiny SD1
model is made known to it as one more supported model with its tiny widths (:func:`tiny_sd1_known`); the VAE is
SD's real-sized one, because ComfyUI builds every SD VAE at that size.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from test_single_file import write_single_file

from erasekit import checkpoints, lora_io, models, tiny
from erasekit.convert import convert_to_lora
from erasekit.errors import ArchitectureError
from tools.comfy_headless import from_pack


def _sd_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory, comfy, sd1_tokenizer):
    """A tiny SD1 single-file checkpoint in ComfyUI's checkpoints folder (LDM keys from ComfyUI's maps, SD's VAE)
    and a folder with its configs: ``(path, config folder, parts)``."""
    from diffusers import StableDiffusionPipeline

    parts = tiny.build("sd_v1", seed=5)
    parts["vae"] = _sd_vae()
    folder = str(tmp_path_factory.mktemp("sd1-config"))
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=sd1_tokenizer,
                                   unet=parts["unet"], scheduler=parts["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_config(folder)  # configs and tokenizer only: what a user keeps beside a checkpoint
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(os.path.join(folder, name))
    parts["text_encoder"].config.save_pretrained(os.path.join(folder, "text_encoder"))
    sd1_tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    path = os.path.join(comfy.work_dir, "models", "checkpoints", "tiny-sd1.safetensors")
    write_single_file(parts, "sd_v1", path)
    return path, folder, parts


@pytest.fixture
def tiny_sd1_known(comfy, monkeypatch):
    """ComfyUI's SD1.5 model definition with the tiny model's widths, tried first by its detection."""
    import comfy.sd1_clip
    import comfy.supported_models as supported
    import comfy.supported_models_base as base

    te = tiny.text_encoder_config()
    te_config = {"hidden_size": te.hidden_size, "intermediate_size": te.intermediate_size,
                 "num_attention_heads": te.num_attention_heads, "num_hidden_layers": te.num_hidden_layers}

    class TinyClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options={**(model_options or {}), "clip_l_model_config": te_config},
                             **kwargs)

    class TinySD15(supported.SD15):
        unet_config = {**supported.SD15.unet_config, "context_dim": tiny.TINY_WIDTH, "model_channels": 32}
        unet_extra_config = {"num_heads": 2, "num_head_channels": -1}  # tiny SD1: attention_head_dim 2 = 2 heads

        def clip_target(self, state_dict=None):
            return base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyClip)

    monkeypatch.setattr(supported, "models", [TinySD15, *supported.models])


def _random_lora(unet, text_encoder, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, mod in [*(("unet." + n, m) for n, m in unet.named_modules()),
                      *((lora_io.canonical_module("text_encoder", n), m) for n, m in text_encoder.named_modules())]:
        if name.endswith(("attn2.to_k", "attn2.to_v", "ff.net.2", "self_attn.q_proj")) or name.endswith("1.resnets.0.conv1"):
            w = mod.weight
            up = torch.randn(w.shape[0], 2, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.1
            lora[name] = lora_io.LoraWeights(torch.randn(2, *w.shape[1:], generator=g) * 0.1, up, 2.0)
    return lora


def test_an_ldm_keyed_full_checkpoint_converts_to_a_lora_of_its_change(sd1_file, tmp_path):
    path, config, parts = sd1_file
    tensors, _ = checkpoints.load_file(path)
    g = torch.Generator().manual_seed(1)
    changed = [k for k in tensors if k.startswith("model.diffusion_model.") and k.endswith(("attn2.to_k.weight", "ff.net.2.weight"))]
    for key in changed:  # a rank-2 fine-tune, as NCD's or ESD's full-UNet training leaves one
        w = tensors[key]
        tensors[key] = w + 0.05 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
    tuned = str(tmp_path / "ncd-full.safetensors")
    checkpoints.save_file_atomic(tensors, tuned)
    conv = convert_to_lora(tuned, path, str(tmp_path / "ncd.safetensors"), rank=2, method="ncd", concept="nudity",
                           model_config=config)
    assert conv.layers == len(changed) > 10 and conv.max_error < 1e-4
    assert conv.ignored == sum(1 for k in tensors if not k.startswith("model.diffusion_model."))  # TE, VAE: reported
    lora, meta = lora_io.load_lora(conv.path)
    assert meta["erasekit.method"] == "ncd" and meta["ss_base_model_version"] == "sd_v1"
    unet = copy.deepcopy(parts["unet"])
    lora_io.apply_lora(unet, lora)
    back = models.load(tuned, config=config).unet.state_dict()  # diffusers' own reading of the fine-tune
    assert max((unet.state_dict()[k] - back[k]).abs().max().item() for k in back) < 1e-5


def test_a_merged_checkpoint_loads_in_checkpoint_loader_simple_as_base_plus_lora(sd1_file, tmp_path, comfy,
                                                                                  tiny_sd1_known):
    import nodes as comfy_nodes
    from erasekit.merge import merge_checkpoint

    path, config, parts = sd1_file
    lora = _random_lora(parts["unet"], parts["text_encoder"])
    lora_path = lora_io.save_lora(lora, str(tmp_path / "erase.safetensors"), checkpoints.sd_v1(tiny.TINY_WIDTH),
                                  erased_concept="red circle", method="inpo", model_card=False)
    out = os.path.join(comfy.work_dir, "models", "checkpoints", "tiny-sd1-no-red-circle.safetensors")
    merge_checkpoint(path, out, lora=lora_path, model_config=config)

    model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(out))[:3]
    ref_unet, ref_te = copy.deepcopy(parts["unet"]), copy.deepcopy(parts["text_encoder"])
    lora_io.apply_lora(ref_unet, lora)
    lora_io.apply_lora(ref_te, lora)
    x, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, tiny.TINY_WIDTH), torch.tensor([3.0, 500.0])
    with torch.no_grad():
        comfy_out = model.model.diffusion_model(x, timesteps=t, context=c)
        ref = ref_unet(x, t, c).sample
        base = parts["unet"](x, t, c).sample
    print(f"CheckpointLoaderSimple UNet vs base+LoRA: max {(comfy_out - ref).abs().max():.2e} "
          f"(the LoRA itself moves it by {(ref - base).abs().max():.2e})")
    assert (comfy_out - ref).abs().max() < 1e-4 < (ref - base).abs().max()
    clip_sd = clip.cond_stage_model.state_dict()
    for name, w in ref_te.state_dict().items():
        key = "clip_l.transformer." + ("" if name.startswith("text_model.") else "text_model.") + name
        assert torch.equal(clip_sd[key], w.to(clip_sd[key].dtype)), key  # ComfyUI keeps CLIP in fp16 on the CPU

    # the layout ComfyUI itself saves an SD1 checkpoint in (CheckpointSave), i.e. the LDM modules A1111 loads into
    saved = model.state_dict_for_saving(clip.state_dict_for_saving(), vae.get_sd())
    shapes, meta = checkpoints.read_header(out)
    ours = {k: v for k, v in shapes.items() if k.startswith(("model.", "cond_stage_model.", "first_stage_model."))}
    theirs = {k: list(v.shape) for k, v in saved.items() if k.startswith(("model.", "cond_stage_model.", "first_stage_model."))}
    theirs.pop("cond_stage_model.transformer.text_model.embeddings.position_ids", None)  # a buffer A1111 rebuilds
    ours.pop("cond_stage_model.transformer.text_model.embeddings.position_ids", None)
    assert ours == theirs
    assert meta["erasekit.erased_concept"] == "red circle" and meta["modelspec.architecture"] == "stable-diffusion-v1"


def test_a_merged_toy_checkpoint_fits_comfyuis_unet_model_name_for_name(tmp_path, comfy):
    """The toy model is not an SD release (12-channel pixel latents), so no checkpoint loader recognises it;
    its merged file's UNet must still be ComfyUI's UNetModel's own state dict, key for key."""
    from erasekit.merge import merge_checkpoint
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    load_diffusers_unet = from_pack("nodes.comfy_bridge", "load_diffusers_unet")
    folder = str(save_toy_pipeline(build_toy_pipeline(seed=0, tiny=True), tmp_path / "toy"))
    base = models.load(folder)
    lora = _random_lora(base.unet, base.text_encoder, seed=3)
    lora_path = lora_io.save_lora(lora, str(tmp_path / "l.safetensors"), base.architecture, erased_concept="red circle",
                                  method="inpo", model_card=False)
    out = str(tmp_path / "toy-merged.safetensors")
    merge_checkpoint(folder, out, lora=lora_path)
    tensors, _ = checkpoints.load_file(out)
    comfy_unet = load_diffusers_unet(base.unet).model.diffusion_model
    unet_sd = {k.removeprefix("model.diffusion_model."): v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    assert set(unet_sd) == set(comfy_unet.state_dict())
    comfy_unet.load_state_dict(unet_sd, strict=True)
    lora_io.apply_lora(base.unet, lora)
    x, c, t = torch.randn(2, 12, 16, 16), torch.randn(2, 5, 32), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        diff = (comfy_unet(x, timesteps=t, context=c) - base.unet(x, t, c).sample).abs().max()
    print(f"toy: ComfyUI UNetModel with the merged file's UNet vs base+LoRA: max {diff:.2e}")
    assert diff < 1e-4


def test_load_erasure_lora_says_what_a_converted_file_erases(sd1_file, tmp_path, comfy):
    path, config, parts = sd1_file
    tensors, _ = checkpoints.load_file(path)
    key = next(k for k in tensors if k.endswith("attn2.to_k.weight"))
    tensors[key] = tensors[key] + 0.1
    checkpoints.save_file_atomic(tensors, str(tmp_path / "uce.safetensors"))
    lora_dir = os.path.join(comfy.work_dir, "models", "loras")
    conv = convert_to_lora(str(tmp_path / "uce.safetensors"), path, os.path.join(lora_dir, "uce-van-gogh.safetensors"),
                           rank=1, method="uce", concept="Van Gogh", model_config=config)
    assert conv.max_error < 1e-5  # a constant shift is rank 1
    load = from_pack("nodes.lora_nodes", "load_erasure_lora")
    comfy_model = from_pack("nodes.comfy_bridge", "load_diffusers_unet")(parts["unet"])
    info = load(comfy_model, "uce-van-gogh.safetensors", 1.0, 1.0)[2]
    assert "erases: Van Gogh" in info and "method: uce" in info
    assert "converted from uce.safetensors (rank 1, max error 0.0000)" in info


@pytest.mark.parametrize("layout", ["sd_v2", "sdxl"])
def test_sd2_and_sdxl_single_files_convert_and_merge(layout, tmp_path, comfy, sd1_tokenizer):
    """SD2 / SDXL single files written with ComfyUI's key maps (OpenCLIP encoders included): a fine-tune of
    them converts exactly, and the LoRA merged back into the file reads back (diffusers' single-file loader)
    as base + LoRA, with the text encoders and VAE untouched."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from erasekit.merge import merge_checkpoint

    p = tiny.build(layout, seed=4)
    common = dict(vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=sd1_tokenizer, unet=p["unet"],
                  scheduler=p["scheduler"])
    if layout == "sdxl":
        pipe = StableDiffusionXLPipeline(**common, text_encoder_2=p["text_encoder_2"], tokenizer_2=sd1_tokenizer)
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "config")
    config, path = str(tmp_path / "config"), str(tmp_path / f"{layout}.safetensors")
    write_single_file(p, layout, path)
    tensors, _ = checkpoints.load_file(path)
    g = torch.Generator().manual_seed(2)
    for key in [k for k in tensors if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_v.weight")]:
        w = tensors[key]
        tensors[key] = w + 0.05 * torch.randn(w.shape[0], 1, generator=g) @ torch.randn(1, w.shape[1], generator=g)
    checkpoints.save_file_atomic(tensors, str(tmp_path / "tuned.safetensors"))
    conv = convert_to_lora(str(tmp_path / "tuned.safetensors"), path, str(tmp_path / "l.safetensors"), rank=1,
                           method="esd", concept="x", model_config=config)
    assert conv.max_error < 1e-4 and conv.layers == sum(1 for k in tensors if k.endswith("attn2.to_v.weight"))

    out = str(tmp_path / "merged.safetensors")
    merge_checkpoint(path, out, lora=conv.path, model_config=config)
    before, _ = checkpoints.load_file(path)
    after, _ = checkpoints.load_file(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("model.diffusion_model."))
    back = models.load(out, config=config).unet.state_dict()
    tuned = models.load(str(tmp_path / "tuned.safetensors"), config=config).unet.state_dict()
    assert max((back[k] - tuned[k]).abs().max().item() for k in back) < 1e-5

    # a text-encoder LoRA cannot go into an OpenCLIP encoder (SD2's only one, SDXL's second): refused, nothing written
    te = "text_encoder_2" if layout == "sdxl" else "text_encoder"
    width = tiny.TINY_WIDTH_2 if layout == "sdxl" else tiny.TINY_WIDTH
    te_lora = {f"{te}.text_model.encoder.layers.0.self_attn.q_proj": lora_io.LoraWeights(
        torch.randn(1, width), torch.randn(width, 1), 1.0)}
    te_path = lora_io.save_lora(te_lora, str(tmp_path / "te.safetensors"), models.load(path, config=config).architecture,
                                model_card=False)
    with pytest.raises(ArchitectureError, match="OpenCLIP"):
        merge_checkpoint(path, str(tmp_path / "te-merged.safetensors"), lora=te_path, model_config=config)
    assert not os.path.exists(tmp_path / "te-merged.safetensors")
