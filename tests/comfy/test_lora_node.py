"""Load Erasure LoRA in real ComfyUI graphs: applies a LoRA exported by Erasekit, refuses one for
another base model with one sentence."""

import shutil

import pytest

from tools.comfy_headless import from_pack


def _graph(model_name, lora_name):
    return {
        "1": {"class_type": "ErasekitLoadDiffusersModel", "inputs": {"model_name": model_name}},
        "30": {"class_type": "ErasekitLoadErasureLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": 1.0, "strength_clip": 1.0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["30", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["30", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["30", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["5", 0], "seed": 0, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "lora"}},
    }


@pytest.fixture(scope="module")
def loras(comfy, tmp_path_factory):
    import os

    import torch

    from erasekit import checkpoints
    from erasekit.bench.lora import export_case, roundtrip_case

    folder = os.path.join(comfy.work_dir, "models", "loras")
    path = export_case(roundtrip_case(seed=1), str(tmp_path_factory.mktemp("lora")))
    shutil.copy(path, os.path.join(folder, "erase-tiny.safetensors"))
    checkpoints.save_file_atomic({"lora_unet_x.lora_down.weight": torch.zeros(4, 2048),
                                  "lora_unet_x.lora_up.weight": torch.zeros(8, 4)},
                                 os.path.join(folder, "xl-style.safetensors"), {"ss_base_model_version": "sdxl_base_v1-0"})
    return folder


def test_lora_with_nan_weights_is_refused_not_applied(comfy, tiny_sd1_in_comfy, loras):
    import os

    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(loras, "erase-tiny.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    save_file(tensors, os.path.join(loras, "nan-weights.safetensors"), {"ss_base_model_version": "sd_v1"})
    with pytest.raises(RuntimeError, match="'nan-weights.safetensors' has NaN or infinite values"):
        comfy.run(_graph(tiny_sd1_in_comfy, "nan-weights.safetensors"))


def test_erasure_lora_applies_in_a_graph(comfy, tiny_sd1_in_comfy, loras):
    out = comfy.run(_graph(tiny_sd1_in_comfy, "erase-tiny.safetensors"))
    assert "9" in out


def test_lora_for_another_model_is_refused(comfy, tiny_sd1_in_comfy, loras):
    with pytest.raises(RuntimeError, match="'xl-style.safetensors' is a LoRA for Stable Diffusion XL, but the model is "
                                           "Stable Diffusion 1.x; pick a LoRA made for Stable Diffusion 1.x."):
        comfy.run(_graph(tiny_sd1_in_comfy, "xl-style.safetensors"))


def test_description_line(comfy):
    meta = {"erasekit.erased_concept": "red circle", "erasekit.method": "inpo", "ss_base_model_version": "toy",
            "erasekit.preserved": '["green circle", "red square"]'}
    describe = from_pack("nodes.lora_nodes", "describe")
    assert describe(meta) == "erases: red circle; method: inpo; base: toy; keeps: green circle, red square"
    # another trainer's LoRA: its trigger phrase is what it adds, not something it erases
    other = {"modelspec.trigger_phrase": "ghibli style", "ss_base_model_version": "sd_1.5"}
    assert describe(other) == "not an Erasekit LoRA (no erased concept recorded); base: sd_1.5"


def test_base_model_is_read_from_comfyui_model_classes(comfy):
    """SDXL's relatives (SSD-1B, Vega, KOALA) are SDXL, SD2 is SD2; a model without a cross-attention
    UNet (Flux, SD3) is refused with a sentence rather than a TypeError."""
    from types import SimpleNamespace

    import comfy.supported_models as known

    model_architecture = from_pack("nodes.lora_nodes", 'model_architecture')

    def patcher(cls):
        return SimpleNamespace(model_options={}, model=SimpleNamespace(model_config=cls(dict(cls.unet_config))))

    assert model_architecture(patcher(known.SSD1B)).name == model_architecture(patcher(known.SDXL)).name == "sdxl_base_v1-0"
    assert model_architecture(patcher(known.SD20)).name == "sd_v2"
    assert model_architecture(patcher(known.SD15)).name == "sd_v1"
    with pytest.raises(ValueError, match="checks LoRAs for SD1.x, SD2.x and SDXL UNet models; this model \\(Flux\\)"):
        model_architecture(patcher(known.Flux))


def test_a_lora_exported_again_under_its_name_is_read_again(comfy, tiny_sd1_in_comfy, loras, tmp_path):
    """The trainer exports over the same file name; ComfyUI's cache must not keep the old LoRA."""
    import os

    import numpy as np
    from PIL import Image

    from erasekit.bench.lora import export_case, roundtrip_case

    images = []
    for seed in (2, 3):
        path = export_case(roundtrip_case(seed=seed), str(tmp_path / str(seed)))
        dest = os.path.join(loras, "erase-again.safetensors")
        shutil.copy(path, dest)
        os.utime(dest, ns=(seed * 10**9, seed * 10**9))  # a new modification time, as a fresh export has
        out = comfy.run(_graph(tiny_sd1_in_comfy, "erase-again.safetensors"))
        images.append(np.asarray(Image.open(comfy.output_path(out["9"]["images"][0]))))
    assert not np.array_equal(images[0], images[1])


def test_the_packs_clip_takes_lora_text_weights_clip_skip_and_long_prompts(comfy, tiny_sd1_in_comfy, loras):
    """The CLIP of Load Diffusers Model keeps its encoder where ComfyUI's SD1 CLIP has it, so a LoRA's
    lora_te_* weights apply (they were dropped: 'lora key not loaded'); CLIP Set Last Layer works; a
    prompt longer than 75 tokens is encoded in chunks, not cut off."""
    import os

    import comfy.sd as comfy_sd
    import torch

    load_diffusers = from_pack("nodes.model_nodes", 'load_diffusers')
    from erasekit import checkpoints

    model, clip, _ = load_diffusers(tiny_sd1_in_comfy)
    tensors, _ = checkpoints.load_file(os.path.join(loras, "erase-tiny.safetensors"))
    assert any(k.startswith("lora_te_") for k in tensors)

    def cond(c, text="a red cat"):
        return c.encode_from_tokens(c.tokenize(text))

    _, patched = comfy_sd.load_lora_for_models(model, clip, tensors, 0.0, 1.0)
    assert not torch.allclose(cond(clip), cond(patched))
    skip = clip.clone()
    skip.clip_layer(-2)
    assert not torch.allclose(cond(clip), cond(skip))
    deep = clip.clone()
    deep.clip_layer(-24)  # past the encoder's depth: the last layer, as ComfyUI's own CLIP does
    assert torch.equal(cond(clip), cond(deep))
    assert cond(clip, " ".join(["red cat"] * 60)).shape[1] == 2 * cond(clip).shape[1]


def test_an_empty_lora_list_says_where_erasure_loras_come_from(comfy, monkeypatch):
    import sys

    module = sys.modules[from_pack("nodes.lora_nodes", "load_erasure_lora").__module__]
    spec = next(s for s in module.SPECS if s.node_id == "ErasekitLoadErasureLoRA")
    lora_input = next(i for i in spec.inputs if i.name == "lora_name")
    monkeypatch.setattr(module, "lora_names", lambda: [])
    assert lora_input.choices() == [module.NO_LORA] and "Erasekit trainer" in module.NO_LORA
    assert "Export" in lora_input.tooltip and "press R" in lora_input.tooltip
    with pytest.raises(ValueError, match=r"No LoRA in ComfyUI's models/loras yet\. Make an erasure LoRA with the "
                                         r"Erasekit trainer .*then press R"):
        module.load_erasure_lora(None, module.NO_LORA, 1.0, 1.0)
