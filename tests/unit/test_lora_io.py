"""LoRA export / import / compatibility / extraction on tiny models (no ComfyUI)."""

import copy
import json
import os

import pytest
import torch

from erasekit import checkpoints, lora_extract, lora_io, tiny
from erasekit.bench.lora import add_random_lora
from erasekit.errors import ArchitectureError, ModelFileError

SD1 = checkpoints.sd_v1(tiny.TINY_WIDTH)
SDXL = checkpoints.sdxl((tiny.TINY_WIDTH, tiny.TINY_WIDTH_2))


@pytest.fixture(scope="module")
def case():
    """Tiny SD1 UNet + text encoder, plain and with random peft LoRAs (lora_alpha != r,
    alpha/rank patterns, 3x3 and 1x1 conv LoRAs)."""
    parts = tiny.build("sd_v1", seed=0)
    unet = add_random_lora(copy.deepcopy(parts["unet"]), ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
                           seed=1, r=4, lora_alpha=8.0, alpha_pattern={"to_k": 2.0, "conv1": 4.0}, rank_pattern={"conv1": 2})
    te = add_random_lora(copy.deepcopy(parts["text_encoder"]), ["q_proj", "v_proj", "fc1"], seed=2, r=2, lora_alpha=3.0)
    lora = lora_io.lora_from_peft(unet=unet, text_encoder=te)
    return {"base": parts, "unet": unet, "te": te, "lora": lora}


def _unet_out(unet):
    torch.manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, tiny.TINY_WIDTH)
    with torch.no_grad():
        return unet(x, torch.tensor([500.0, 20.0]), encoder_hidden_states=ctx).sample


def _te_out(te):
    ids = torch.arange(1, 78).unsqueeze(0) * 97 % 49000
    with torch.no_grad():
        return te(ids).last_hidden_state


def test_alpha_comes_from_what_peft_applies(case):
    lora = case["lora"]
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert lora[q].rank == 4 and lora[q].alpha == 8.0
    assert lora[q.replace("to_q", "to_k")].alpha == 2.0  # alpha_pattern
    conv = lora["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.rank == 2 and conv.alpha == 4.0 and conv.down.shape[-2:] == (3, 3) and conv.up.shape[-2:] == (1, 1)
    assert lora["text_encoder.text_model.encoder.layers.1.mlp.fc1"].alpha == 3.0  # text_model. restored


@pytest.mark.parametrize("save_format", ["kohya", "peft"])
def test_export_import_merge_matches_peft(case, tmp_path, save_format):
    path = lora_io.save_lora(case["lora"], tmp_path / "erase-x", SD1, save_format=save_format,
                             erased_concept="Van Gogh", method="esd-x")
    lora, meta = lora_io.load_lora(path)
    assert set(lora) == set(case["lora"])
    for name, w in case["lora"].items():  # same weight change, however alpha was written
        assert torch.allclose(lora[name].delta(), w.delta(), atol=1e-6), name
    unet, te = copy.deepcopy(case["base"]["unet"]), copy.deepcopy(case["base"]["text_encoder"])
    assert lora_io.apply_lora(unet, lora) == sum(k.startswith("unet.") for k in lora)
    assert lora_io.apply_lora(te, lora) == 6
    assert (_unet_out(unet) - _unet_out(case["unet"])).abs().max() < 1e-4
    assert (_te_out(te) - _te_out(case["te"])).abs().max() < 1e-4


def test_kohya_keys_metadata_and_model_card(case, tmp_path):
    path = lora_io.save_lora(case["lora"], tmp_path / "no-van-gogh.safetensors", SD1, erased_concept="Van Gogh",
                             method="esd-x", preserved=["Monet", "Picasso"], config={"lr": 1e-5, "steps": 200})
    shapes, meta = checkpoints.read_header(path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight" in shapes
    assert shapes["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"][-2:] == [3, 3]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in shapes
    assert shapes["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] == []
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_output_name",
                "ss_v2", "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                "modelspec.title", "modelspec.description", "modelspec.trigger_phrase", "modelspec.date",
                "modelspec.license", "modelspec.resolution", "erasekit.method", "erasekit.erased_concept",
                "erasekit.preserved", "erasekit.config"):
        assert isinstance(meta[key], str) and meta[key], key
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.trigger_phrase"] == "Van Gogh" and meta["ss_output_name"] == "no-van-gogh"
    assert json.loads(meta["erasekit.preserved"]) == ["Monet", "Picasso"]
    assert json.loads(meta["ss_network_args"])["conv_alpha"] == meta["ss_network_alpha"]  # the file has one alpha
    assert json.loads(meta["erasekit.config"])["steps"] == 200
    card = (tmp_path / "no-van-gogh.md").read_text()
    assert "Van Gogh" in card and "ComfyUI" in card and "<lora:no-van-gogh:1>" in card and "load_lora_weights" in card


@pytest.mark.parametrize("error", ["os", "safetensors"])
def test_write_is_atomic(case, tmp_path, monkeypatch, error):
    import safetensors
    import safetensors.torch

    path = tmp_path / "erase.safetensors"
    path.write_bytes(b"previous good file")

    def full_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        if error == "os":
            raise OSError(28, "No space left on device")
        # how safetensors itself reports a failed write (e.g. over a file-size limit)
        raise safetensors.SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(ModelFileError, match="free disk space"):
        lora_io.save_lora(case["lora"], path, SD1, model_card=False)
    assert path.read_bytes() == b"previous good file"
    assert os.listdir(tmp_path) == ["erase.safetensors"]  # no temporary file left


@pytest.mark.parametrize("layout", tiny.LAYOUTS)
def test_kohya_names_convert_back_to_module_paths(layout):
    parts = tiny.build(layout)
    for model in (parts["unet"], parts.get("text_encoder_2", parts["text_encoder"])):
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                assert lora_io._undot(name.replace(".", "_")) == name


def test_sdxl_lora_refused_for_sd1_with_one_sentence(tmp_path):
    parts = tiny.build("sdxl")
    add_random_lora(parts["unet"], ["to_k", "to_v"], r=2, lora_alpha=2)
    add_random_lora(parts["text_encoder_2"], ["q_proj"], r=2, lora_alpha=2)
    lora = lora_io.lora_from_peft(unet=parts["unet"], text_encoder_2=parts["text_encoder_2"])
    path = lora_io.save_lora(lora, tmp_path / "x.safetensors", SDXL, model_card=False)
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in checkpoints.read_header(path)[0]
    assert lora_io.check_compatible(path, SDXL) == "sdxl"
    msg = ("'x.safetensors' is a LoRA for Stable Diffusion XL, but the model is Stable Diffusion 1.x; "
           "pick a LoRA made for Stable Diffusion 1.x.")
    with pytest.raises(ArchitectureError) as err:
        lora_io.check_compatible(path, SD1)
    assert str(err.value) == msg
    # without metadata: the key names (a second text encoder) tell the same
    sd, _ = checkpoints.load_file(path)
    checkpoints.save_file_atomic(sd, str(tmp_path / "x2.safetensors"))
    with pytest.raises(ArchitectureError, match="is a LoRA for Stable Diffusion XL, but the model is Stable Diffusion 1.x"):
        lora_io.check_compatible(tmp_path / "x2.safetensors", SD1)


def test_width_tells_sd1_from_sd2_without_metadata(tmp_path):
    r = 2
    sd = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(r, 768),
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, r),
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(1.0)}
    path = str(tmp_path / "sd15-style.safetensors")
    checkpoints.save_file_atomic(sd, path)
    assert lora_io.check_compatible(path, checkpoints.sd_v1()) is None
    with pytest.raises(ArchitectureError) as err:
        lora_io.check_compatible(path, checkpoints.sd_v2())
    assert str(err.value) == ("'sd15-style.safetensors' is a LoRA for Stable Diffusion 1.x, but the model is "
                              "Stable Diffusion 2.x; pick a LoRA made for Stable Diffusion 2.x.")


@pytest.mark.parametrize("version, family", [("sd_1.5", "sd_v1"), ("SD 1.5", "sd_v1"), ("sd_v1", "sd_v1"),
                                             ("sd_2.1", "sd_v2"), ("sd_v2_v", "sd_v2"), ("sdxl_1.0", "sdxl"),
                                             ("sdxl_base_v1-0", "sdxl"), ("pony", "pony")])
def test_other_trainers_base_model_names(tmp_path, version, family):
    """ai-toolkit writes ss_base_model_version "sd_1.5" / "sdxl_1.0", hubs "SD 1.5": the same families
    as kohya's "sd_v1" / "sdxl_base_v1-0". A name nobody knows ("pony") leaves it to the layer widths."""
    assert lora_io.family(version) == family
    sd = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(2, 768),
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 2)}
    path = str(tmp_path / "l.safetensors")
    checkpoints.save_file_atomic(sd, path, metadata={"ss_base_model_version": version})
    if family in ("sd_v1", "pony"):  # 768-wide text: SD1
        assert lora_io.check_compatible(path, checkpoints.sd_v1()) == family
    else:
        with pytest.raises(ArchitectureError, match=f"is a LoRA for {lora_io.FAMILY_TITLES[family]}, but"):
            lora_io.check_compatible(path, checkpoints.sd_v1())
    with pytest.raises(ArchitectureError, match="but the model is Stable Diffusion XL"):
        lora_io.check_compatible(path, checkpoints.sdxl())


def test_a_flux_lora_with_clip_l_weights_is_refused(tmp_path):
    """Flux / SD3 LoRAs carry CLIP-L weights as wide as SD1's text encoder and no cross-attention: the
    name decides."""
    sd = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 768),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 2),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 3072),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 2)}
    path = str(tmp_path / "flux.safetensors")
    checkpoints.save_file_atomic(sd, path, metadata={"ss_base_model_version": "flux1"})
    for arch in (checkpoints.sd_v1(), checkpoints.sdxl()):
        with pytest.raises(ArchitectureError, match="is a LoRA for flux1, but the model is"):
            lora_io.check_compatible(path, arch)


def test_corrupt_and_non_lora_files_get_clear_errors(case, tmp_path):
    path = lora_io.save_lora(case["lora"], tmp_path / "ok.safetensors", SD1, model_card=False)
    data = open(path, "rb").read()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    for call in (lora_io.load_lora, lambda p: lora_io.check_compatible(p, SD1)):
        with pytest.raises(ModelFileError, match="'.*cut.safetensors' is not a valid safetensors file"):
            call(str(bad))
    sd, _ = checkpoints.load_file(path)
    half = {k: v for k, v in sd.items() if not k.endswith(".lora_up.weight")}  # a download that lost its up weights
    checkpoints.save_file_atomic(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(ModelFileError, match="has '.*lora_down.weight' without its 'lora_up.weight': the file is incomplete"):
        lora_io.load_lora(str(tmp_path / "half.safetensors"))
    ldm = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k." + s: t for s, t in
           (("lora_down.weight", torch.zeros(2, 768)), ("lora_up.weight", torch.zeros(640, 2)))}
    checkpoints.save_file_atomic(ldm, str(tmp_path / "ldm.safetensors"))  # sd-scripts' SDXL names
    with pytest.raises(ModelFileError, match=r"names its layers the original \(LDM\) way"):
        lora_io.load_lora(str(tmp_path / "ldm.safetensors"))
    other = str(tmp_path / "unet.safetensors")
    checkpoints.save_file_atomic({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, other)
    with pytest.raises(ModelFileError, match="is not a LoRA"):
        lora_io.load_lora(other)
    with pytest.raises(ModelFileError, match="is not a LoRA"):
        lora_io.check_compatible(other, SD1)


def test_apply_refuses_a_lora_for_another_layout(case):
    sdxl_unet = tiny.build("sdxl")["unet"]
    with pytest.raises(ArchitectureError, match="it was made for another model"):
        lora_io.apply_lora(sdxl_unet, case["lora"])


def test_svd_extraction_reconstructs_a_low_rank_update():
    torch.manual_seed(0)
    original = tiny.build("sd_v1")["unet"].state_dict()
    keys = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",  # linear [32, 32]
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight",
            "down_blocks.0.resnets.0.conv1.weight"]  # conv 3x3 [32, 32, 3, 3]
    tuned = {}
    for k in keys:  # ESD/UCE-style partial dict: only the changed weights, each + a rank-2 update
        w = original[k]
        delta = torch.randn(w.shape[0], 2) @ torch.randn(2, w[0].numel())
        tuned[k] = w + 0.1 * delta.reshape(w.shape)
    bias = "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.bias"
    tuned[bias] = original[bias] + 0.5
    ext = lora_extract.extract_lora(original, tuned, rank=8, sv_fro=0.9999)
    assert set(ext.lora) == {"unet." + k[: -len(".weight")] for k in keys}
    assert all(w.rank == 2 for w in ext.lora.values())  # sv_fro chose the true rank
    assert ext.max_error < 1e-4 and set(ext.errors) == set(ext.lora)
    assert list(ext.skipped) == [bias]  # a bias change a LoRA cannot hold, reported
    conv = ext.lora["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.down.shape == (2, 32, 3, 3) and conv.up.shape == (32, 2, 1, 1)
    merged = tiny.build("sd_v1")["unet"]
    lora_io.apply_lora(merged, ext.lora)
    for k in keys:
        assert torch.allclose(merged.state_dict()[k], tuned[k], atol=1e-5)
    # a text encoder's token embedding is 2-D, but no loader applies a LoRA to it: reported, not exported
    te = tiny.build("sd_v1")["text_encoder"].state_dict()
    emb = next(k for k in te if k.endswith("token_embedding.weight"))
    te_ext = lora_extract.extract_lora(te, {emb: te[emb] + 0.1}, rank=2, component="text_encoder")
    assert not te_ext.lora and list(te_ext.skipped) == [emb]
    # a fixed rank below the true rank: the error is reported, not hidden
    assert lora_extract.extract_lora(original, tuned, rank=1).max_error > 0.05
    # clamping each matrix at its own quantile keeps the error moderate
    assert 0 < lora_extract.extract_lora(original, tuned, rank=2, clamp_quantile=0.99).max_error < 0.2


def test_bench_strength_is_the_loaders_weight(case):
    """The erase benchmark's strength sweep scales the trained peft LoRA exactly as a LoRA loader
    merging the exported file at that weight does (per-layer alpha / rank patterns included)."""
    from types import SimpleNamespace

    from erasekit.bench.erase import _set_lora_strength

    comps = SimpleNamespace(unet=copy.deepcopy(case["unet"]), text_encoder=copy.deepcopy(case["te"]))
    for strength in (0.5, 0.0, 1.0):
        _set_lora_strength(comps, strength)
        unet, te = copy.deepcopy(case["base"]["unet"]), copy.deepcopy(case["base"]["text_encoder"])
        lora_io.apply_lora(unet, case["lora"], strength=strength)
        lora_io.apply_lora(te, case["lora"], strength=strength)
        assert (_unet_out(comps.unet) - _unet_out(unet)).abs().max() < 1e-4, strength
        assert (_te_out(comps.text_encoder) - _te_out(te)).abs().max() < 1e-4, strength
    assert (_unet_out(comps.unet) - _unet_out(case["unet"])).abs().max() == 0  # back at 1: as trained
