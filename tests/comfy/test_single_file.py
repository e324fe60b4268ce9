"""Single-file SD checkpoints (written in the original LDM layout with ComfyUI's own key maps)
load through erasekit.models with a local config folder, and compute what the modules did."""

import torch

from erasekit import checkpoints, models, tiny


def test_sd1_single_file_loads_offline_and_matches(tmp_path, comfy, sd1_tokenizer):
    import comfy.diffusers_convert
    import comfy.utils
    from diffusers import StableDiffusionPipeline

    from comfy_nodes.comfy_bridge import comfy_unet_config

    p = tiny.build("sd_v1", seed=7)
    StableDiffusionPipeline(vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=sd1_tokenizer, unet=p["unet"],
                            scheduler=p["scheduler"], safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "config")
    key_map = comfy.utils.unet_to_diffusers(comfy_unet_config(dict(p["unet"].config)))
    sd = {"model.diffusion_model." + key_map[k]: v for k, v in p["unet"].state_dict().items()}
    sd |= {"first_stage_model." + k: v for k, v in comfy.diffusers_convert.convert_vae_state_dict(p["vae"].state_dict()).items()}
    sd |= {"cond_stage_model.transformer.text_model." + k: v for k, v in p["text_encoder"].state_dict().items()}
    path = tmp_path / "tiny-sd15.safetensors"
    checkpoints.save_file_atomic(sd, str(path))

    comps = models.load(str(path), config=str(tmp_path / "config"))
    assert comps.architecture.name == "sd_v1"
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 5, tiny.TINY_WIDTH)
    ids = sd1_tokenizer("a red circle", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(comps.unet(x, 3, c).sample, p["unet"](x, 3, c).sample, atol=1e-5)
        assert torch.allclose(comps.text_encoder(ids)[0], p["text_encoder"](ids)[0], atol=1e-5)
        assert torch.allclose(comps.vae.decode(x).sample, p["vae"].decode(x).sample, atol=1e-5)


def test_diffusers_folder_loads_with_its_architecture(tmp_path, comfy, sd1_tokenizer):
    from conftest import save_tiny_sd1

    p = save_tiny_sd1(str(tmp_path / "tiny"), sd1_tokenizer, seed=2)
    comps = models.load(str(tmp_path / "tiny"))
    assert comps.architecture.name == "sd_v1" and comps.tokenizer is not None
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 5, tiny.TINY_WIDTH)
    with torch.no_grad():
        assert torch.allclose(comps.unet(x, 3, c).sample, p["unet"](x, 3, c).sample, atol=1e-5)
