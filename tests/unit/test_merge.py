"""Base + erasure LoRA (or a fine-tuned UNet) -> one single-file checkpoint in the original SD layout
(erasekit/merge.py, ``python -m trainer merge``). Read back by diffusers' own single-file loader (SD1) and
converter (the toy model), it must compute what the base with the LoRA applied computes. Real ComfyUI's
CheckpointLoaderSimple and A1111's key layout: tests/comfy/test_convert_merge.py."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from erasekit import checkpoints, lora_io, models, tiny
from erasekit.errors import ArchitectureError, ErasekitError
from erasekit.lora_io import LoraWeights
from erasekit.merge import merge_checkpoint


def _tokenizer():
    from transformers import AutoTokenizer

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return AutoTokenizer.from_pretrained(os.path.join(repo, "models", "toy", "tokenizer"))


def random_lora(unet, text_encoder=None, seed: int = 0) -> dict:
    """A rank-2 LoRA on cross-attention, feed-forward and a 3x3 convolution (and the text encoder's q_proj)."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, mod in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v", "ff.net.2")) or name == "down_blocks.1.resnets.0.conv1":
            w = mod.weight
            up = torch.randn(w.shape[0], 2, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.1
            lora["unet." + name] = LoraWeights(torch.randn(2, *w.shape[1:], generator=g) * 0.1, up, 3.0)
    for name, mod in (text_encoder.named_modules() if text_encoder is not None else ()):
        if name.endswith("self_attn.q_proj"):
            w = mod.weight
            lora[lora_io.canonical_module("text_encoder", name)] = LoraWeights(
                torch.randn(2, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], 2, generator=g) * 0.1, 2.0)
    return lora


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd1") / "tiny-sd1")
    tiny.save_sd1_folder(folder, _tokenizer(), seed=3)
    return folder


def test_an_sd1_merge_reads_back_through_diffusers_as_base_plus_lora(sd1, tmp_path):
    base = models.load(sd1)
    lora = random_lora(base.unet, base.text_encoder)
    path = lora_io.save_lora(lora, str(tmp_path / "erase.safetensors"), base.architecture, erased_concept="red circle",
                             method="inpo", config={"train": {"steps": 300}}, model_card=False)
    out = str(tmp_path / "sd1-no-red-circle.safetensors")
    merged = merge_checkpoint(sd1, out, lora=path, settings={"note": "test"})
    assert merged.unet_changed == sum(1 for m in lora if m.startswith("unet.")) and merged.text_changed == 2
    assert (merged.method, merged.concept) == ("inpo", "red circle")  # from the LoRA's own metadata

    shapes, meta = checkpoints.read_header(out, "checkpoint")
    assert checkpoints.detect_architecture(shapes).name == "sd_v1"
    assert {k.split(".")[0] for k in shapes} == {"model", "cond_stage_model", "first_stage_model"}
    assert meta["erasekit.method"] == "inpo" and meta["erasekit.erased_concept"] == "red circle"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["erasekit.merged"] == "erase.safetensors"
    assert json.loads(meta["erasekit.config"])["settings"] == {"note": "test"}

    back = models.load(out, config=sd1)  # diffusers' from_single_file, LDM -> diffusers by its own converter
    ref = models.load(sd1)
    lora_io.apply_lora(ref.unet, lora)
    lora_io.apply_lora(ref.text_encoder, lora)
    x, c, ids = torch.randn(2, 4, 8, 8), torch.randn(2, 5, tiny.TINY_WIDTH), torch.randint(0, 1000, (1, 77))
    with torch.no_grad():
        assert (back.unet(x, 3, c).sample - ref.unet(x, 3, c).sample).abs().max() < 1e-5
        assert (back.unet(x, 3, c).sample - base.unet(x, 3, c).sample).abs().max() > 1e-3  # the LoRA is in it
        assert (back.text_encoder(ids)[0] - ref.text_encoder(ids)[0]).abs().max() < 1e-5
        assert torch.equal(back.vae.decode(x).sample, base.vae.decode(x).sample)


def test_a_toy_merge_has_the_unet_diffusers_reads_back(tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    folder = str(save_toy_pipeline(build_toy_pipeline(seed=0, tiny=True), tmp_path / "toy"))
    base = models.load(folder)
    lora = random_lora(base.unet, seed=1)
    path = lora_io.save_lora(lora, str(tmp_path / "l.safetensors"), base.architecture, erased_concept="red circle",
                             method="inpo", model_card=False)
    out = str(tmp_path / "toy-merged.safetensors")
    merge_checkpoint(folder, out, lora=path, strength=0.5)
    tensors, meta = checkpoints.load_file(out)
    assert json.loads(meta["erasekit.config"])["merge"]["strength"] == 0.5
    unet = copy.deepcopy(base.unet)
    unet.load_state_dict(convert_ldm_unet_checkpoint(tensors, dict(base.unet.config)), strict=True)
    te_keys = {k.removeprefix("cond_stage_model.transformer.text_model.") for k in tensors if k.startswith("cond_stage_model.")}
    assert te_keys == {k.removeprefix("text_model.") for k in base.text_encoder.state_dict()}
    lora_io.apply_lora(base.unet, lora, strength=0.5)
    x, c = torch.randn(2, 12, 16, 16), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert (unet(x, 10, c).sample - base.unet(x, 10, c).sample).abs().max() < 1e-5


def test_a_fine_tuned_unet_merges_in_whole(sd1, tmp_path):
    from safetensors.torch import save_file

    base = models.load(sd1)
    tuned = {k: v + 0.01 * torch.randn_like(v) for k, v in base.unet.state_dict().items() if ".attn2." in k}
    save_file(tuned, str(tmp_path / "esd-x.safetensors"))
    out = str(tmp_path / "esd.safetensors")
    merged = merge_checkpoint(sd1, out, unet=str(tmp_path / "esd-x.safetensors"), method="esd", concept="van gogh")
    assert merged.unet_changed == len(tuned) and merged.text_changed == 0
    back = models.load(out, config=sd1).unet.state_dict()
    assert all(torch.equal(back[k], v) for k, v in tuned.items())
    assert checkpoints.read_header(out)[1]["erasekit.erased_concept"] == "van gogh"


def test_a_single_file_base_keeps_its_layout_and_dtype(sd1, tmp_path):
    """A half-precision single-file base: the merge writes into the file's own tensors, in its dtype, and
    leaves every weight it does not change bit for bit."""
    first = str(tmp_path / "sd1-full.safetensors")
    merge_checkpoint(sd1, first, unet=os.path.join(sd1, "unet"))  # the base itself, as one file
    tensors, _ = checkpoints.load_file(first)
    half = str(tmp_path / "sd1-fp16.safetensors")
    checkpoints.save_file_atomic({k: v.half() for k, v in tensors.items()} | {"global_step": torch.tensor([1])}, half)
    base = models.load(half, config=sd1)
    lora = random_lora(base.unet, seed=2)
    path = lora_io.save_lora(lora, str(tmp_path / "l.safetensors"), base.architecture, model_card=False)
    out = str(tmp_path / "merged-fp16.safetensors")
    with pytest.raises(ArchitectureError, match=r"'sd1-fp16.safetensors' does not fit the UNet config in '.*sd_v1': its "
                                                r"'model.diffusion_model.\S+' is \[.*\], the config's \[.*\]; pass a "
                                                "diffusers folder of this model"):
        merge_checkpoint(half, out, lora=path)  # the shipped SD1.5 config: real widths, not the tiny model's
    merged = merge_checkpoint(half, out, lora=path, concept="red circle", model_config=sd1)  # tiny widths: its configs
    before, _ = checkpoints.load_file(half)
    after, _ = checkpoints.load_file(out)
    assert before.keys() == after.keys() and all(t.dtype == before[k].dtype for k, t in after.items())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == merged.unet_changed and all(k.startswith("model.diffusion_model.") for k in changed)


def test_refusals_are_one_sentence_and_write_nothing(sd1, tmp_path):
    from erasekit.toyworld.model import build_toy_pipeline

    toy = build_toy_pipeline(seed=0, tiny=True)
    lora = random_lora(toy.unet)
    path = lora_io.save_lora(lora, str(tmp_path / "toy-lora.safetensors"), checkpoints.toy(32), model_card=False)
    with pytest.raises(ArchitectureError, match="'toy-lora.safetensors' is a LoRA for Erasekit toy model, but the model "
                                                "is Stable Diffusion 1.x"):
        merge_checkpoint(sd1, str(tmp_path / "out.safetensors"), lora=path)
    with pytest.raises(ErasekitError, match="must be a .safetensors file"):
        merge_checkpoint(sd1, str(tmp_path / "out.ckpt"), lora=path)
    assert sorted(os.listdir(tmp_path)) == ["toy-lora.safetensors"]


def test_the_cli_merges(sd1, tmp_path, capsys):
    from trainer.cli import main

    base = models.load(sd1)
    path = lora_io.save_lora(random_lora(base.unet), str(tmp_path / "l.safetensors"), base.architecture,
                             erased_concept="red circle", method="inpo", model_card=False)
    out = str(tmp_path / "m.safetensors")
    assert main(["merge", "--lora", path, "--base", sd1, "--out", out]) == 0
    assert "erases: red circle" in capsys.readouterr().out and os.path.isfile(out)
    assert main(["merge", "--lora", str(tmp_path / "missing.safetensors"), "--base", sd1, "--out", out]) == 2
    assert "missing.safetensors' does not exist" in capsys.readouterr().err


def test_an_sdxl_folder_base_is_refused_with_what_to_pass_instead(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    p = tiny.build("sdxl", seed=1)
    tok = _tokenizer()
    StableDiffusionXLPipeline(vae=p["vae"], text_encoder=p["text_encoder"], text_encoder_2=p["text_encoder_2"],
                              tokenizer=tok, tokenizer_2=tok, unet=p["unet"], scheduler=p["scheduler"]
                              ).save_pretrained(tmp_path / "sdxl")
    arch = models.load(str(tmp_path / "sdxl")).architecture
    path = lora_io.save_lora(random_lora(p["unet"]), str(tmp_path / "l.safetensors"), arch, model_card=False)
    with pytest.raises(ArchitectureError, match="as a diffusers folder; its OpenCLIP text encoder has no original-layout "
                                                "writer here: pass the same model as its single-file"):
        merge_checkpoint(str(tmp_path / "sdxl"), str(tmp_path / "out.safetensors"), lora=path)
    assert not os.path.exists(tmp_path / "out.safetensors")


def test_a_full_disk_leaves_no_checkpoint_and_says_so(sd1, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    base = models.load(sd1)
    path = lora_io.save_lora(random_lora(base.unet), str(tmp_path / "l.safetensors"), base.architecture, model_card=False)

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # part of the file made it to the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ErasekitError, match=r"Could not write '.*merged.safetensors' \(No space left on device\); free "
                                            "disk space or pick another folder"):
        merge_checkpoint(sd1, str(tmp_path / "merged.safetensors"), lora=path)
    assert sorted(os.listdir(tmp_path)) == ["l.safetensors"]
