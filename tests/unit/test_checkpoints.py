"""Weight files: safe reading, clear errors, architecture detection."""

import os

import pytest
import torch

from erasekit import checkpoints
from erasekit.errors import ArchitectureError, ModelFileError


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(ModelFileError, match=r"nope\.safetensors' does not exist"):
        checkpoints.read_header(str(path))


def test_pickle_files_are_refused_before_reading(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04 not even read")
    with pytest.raises(ModelFileError, match="pickle file, which can run code"):
        checkpoints.load_file(str(path))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors_gives_one_sentence(tmp_path, damage):
    good = tmp_path / "good.safetensors"
    checkpoints.save_file_atomic({"w": torch.ones(64, 64)}, str(good))
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes({"garbage": b"\x00" * 3 + b"hello world" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(ModelFileError) as err:
        checkpoints.load_file(str(bad))
    msg = str(err.value)
    assert "bad.safetensors" in msg and "not a valid safetensors file" in msg and "\n" not in msg


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "out.safetensors"
    checkpoints.save_file_atomic({"w": torch.zeros(2)}, str(target))

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(ModelFileError, match="No space left on device.*free disk space"):
        checkpoints.save_file_atomic({"w": torch.ones(2)}, str(target))
    assert os.listdir(tmp_path) == ["out.safetensors"]  # old file intact, no temp left behind
    tensors, _ = checkpoints.load_file(str(target))
    assert torch.equal(tensors["w"], torch.zeros(2))


def _ldm(**extra):
    shapes = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": [320, 320, 1, 1],
    }
    shapes.update(extra)
    return shapes


def test_detects_sd1_sd2_sdxl_by_structure():
    sd1 = checkpoints.detect_architecture(_ldm(**{"cond_stage_model.transformer.text_model.final_layer_norm.weight": [768]}))
    assert (sd1.name, sd1.context_dim) == ("sd_v1", 768)
    sd2 = checkpoints.detect_architecture({
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 1024],
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": [320, 320],
        "cond_stage_model.model.ln_final.weight": [1024]})
    assert sd2.name == "sd_v2"
    xl = checkpoints.detect_architecture({
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [640, 2048],
        "model.diffusion_model.label_emb.0.0.weight": [1280, 2816],
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": [768],
        "conditioner.embedders.1.model.ln_final.weight": [1280]})
    assert (xl.name, xl.text_widths) == ("sdxl_base_v1-0", (768, 1280))


def test_unknown_architecture_is_named():
    with pytest.raises(ArchitectureError, match="'flux.safetensors' is not a checkpoint of a known architecture"):
        checkpoints.detect_architecture({"double_blocks.0.img_attn.qkv.weight": [9216, 3072]}, "flux.safetensors")
