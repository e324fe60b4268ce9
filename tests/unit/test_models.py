"""Loading model parts from a diffusers folder and from memory, and the errors on bad input."""

import pytest
import torch

from erasekit import models, tiny
from erasekit.errors import ArchitectureError, ModelFileError


def test_from_modules_detects_each_layout():
    for layout, name in [("sd_v1", "sd_v1"), ("sd_v2", "sd_v2"), ("sdxl", "sdxl_base_v1-0")]:
        p = tiny.build(layout)
        comps = models.from_modules(p["unet"], p["text_encoder"], None, p["vae"], p["scheduler"], p.get("text_encoder_2"))
        assert comps.architecture.name == name
        assert comps.architecture.context_dim == p["unet"].config.cross_attention_dim


def test_folder_without_model_index_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelFileError, match="is not a diffusers model \\(no model_index.json\\)"):
        models.load(str(tmp_path))


def test_single_file_without_config_folder_says_what_is_missing(tmp_path, monkeypatch):
    from erasekit import checkpoints

    path = tmp_path / "sd15.safetensors"
    checkpoints.save_file_atomic({
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32, 32),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(32, 32, 1, 1),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(32),
    }, str(path))
    with pytest.raises(ModelFileError, match=r"is a Stable Diffusion 1.x checkpoint, but the config folder"):
        models.load(str(path), config=str(tmp_path / "nowhere"))
    # no folder given: the shipped SD1 config, offline; this tiny file does not fit it, which says --model-config
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ArchitectureError, match=r"does not fit the config in '.*models/configs/sd_v1'.*--model-config"):
        models.load(str(path))
