"""Other people's erased weights -> an erasure LoRA (erasekit/convert.py, ``python -m trainer convert``).

The fine-tunes are made here: the base UNet plus a known low-rank change on many layers (attention,
feed-forward, a 3x3 convolution), so the LoRA must hold it exactly at a rank >= the change's and cannot
at a lower one. LDM-keyed files written with ComfyUI's own key map are in tests/comfy/test_convert_merge.py.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from erasekit import checkpoints, lora_io
from erasekit.convert import convert_to_lora, read_weights
from erasekit.errors import ArchitectureError, ModelFileError
from erasekit.ldm_keys import LDM_UNET, unet_ldm_names

DELTA_RANK = 3
_CHANGED = ("attn2.to_k", "attn2.to_v", "attn1.to_out.0", "ff.net.2")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    pipe = build_toy_pipeline(seed=0, tiny=True)
    return str(save_toy_pipeline(pipe, tmp_path_factory.mktemp("toy") / "toy")), pipe.unet


def tuned_weights(unet, seed: int = 0, rank: int = DELTA_RANK) -> dict:
    """The UNet's state dict with a rank-``rank`` change (about 5% of each weight's norm) on the layers
    :data:`_CHANGED` names and on one 3x3 convolution, and a changed bias a LoRA cannot hold."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in unet.state_dict().items()}
    changed = [k for k in sd if k.endswith(tuple(f"{m}.weight" for m in _CHANGED))]
    changed.append("down_blocks.1.resnets.0.conv1.weight")
    for key in changed:
        w = sd[key]
        delta = (torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w[0].numel(), generator=g)).reshape(w.shape)
        sd[key] = w + 0.05 * w.norm() / delta.norm() * delta
    sd["conv_out.bias"] = sd["conv_out.bias"] + 0.01
    return sd


def _apply(unet, lora_path):
    import copy

    merged = copy.deepcopy(unet)
    lora, _ = lora_io.load_lora(lora_path)
    lora_io.apply_lora(merged, lora)
    return merged.state_dict()


@pytest.mark.parametrize("rank", [DELTA_RANK, 8])
def test_a_diffusers_keyed_full_unet_converts_exactly_at_its_rank(toy, tmp_path, rank):
    folder, unet = toy
    tuned = tuned_weights(unet)
    save_file(tuned, str(tmp_path / "ncd-unet.safetensors"))
    conv = convert_to_lora(str(tmp_path / "ncd-unet.safetensors"), folder, str(tmp_path / "out.safetensors"),
                           rank=rank, method="ncd", concept="red circle")
    assert conv.layers == sum(1 for k in tuned if not torch.equal(tuned[k], unet.state_dict()[k]) and k.endswith("weight"))
    assert conv.max_error < 1e-4 and conv.rank == rank
    assert list(conv.not_in_lora) == ["conv_out.bias"]  # reported, not silently lost
    merged = _apply(unet, conv.path)
    for key, w in tuned.items():
        if key != "conv_out.bias":
            assert (merged[key] - w).abs().max() < 1e-5, key


def test_a_rank_below_the_change_is_reported_as_a_large_error(toy, tmp_path):
    folder, unet = toy
    save_file(tuned_weights(unet), str(tmp_path / "t.safetensors"))
    conv = convert_to_lora(str(tmp_path / "t.safetensors"), folder, str(tmp_path / "out.safetensors"), rank=1)
    assert 0.2 < conv.max_error < 1 and conv.worst[0][1] == pytest.approx(conv.max_error)
    assert "raise --rank" in conv.summary()


def test_the_metadata_says_method_concept_source_and_error(toy, tmp_path):
    folder, unet = toy
    save_file(tuned_weights(unet), str(tmp_path / "esd-x.safetensors"))
    conv = convert_to_lora(str(tmp_path / "esd-x.safetensors"), folder, str(tmp_path / "out.safetensors"),
                           rank=4, method="esd", concept="red circle")
    _, meta = checkpoints.read_header(conv.path)
    assert meta["erasekit.method"] == "esd" and meta["erasekit.erased_concept"] == "red circle"
    assert meta["erasekit.source_file"] == "esd-x.safetensors" and meta["ss_sd_model_name"] == "toy"
    extraction = json.loads(meta["erasekit.extraction"])
    assert extraction["rank"] == 4 and extraction["max_error"] == pytest.approx(conv.max_error, abs=1e-6)
    config = json.loads(meta["erasekit.config"])["convert"]
    assert config["source"] == "esd-x.safetensors" and config["not_in_lora"] == ["conv_out.bias"]
    assert meta["ss_base_model_version"] == "toy" and meta["ss_network_dim"] == "4"
    assert os.path.isfile(str(tmp_path / "out.md"))  # the model card beside it
    assert not any(str(tmp_path) in v for v in meta.values())  # file names only, never this machine's folders


def test_a_partial_ldm_keyed_pickle_of_plain_tensors_converts(toy, tmp_path):
    """An ESD/UCE-style file: only the cross-attention weights, LDM names, a .pt of a state_dict."""
    folder, unet = toy
    tuned = tuned_weights(unet)
    names = unet_ldm_names(tuned, dict(unet.config))
    partial = {LDM_UNET + names[k]: v for k, v in tuned.items() if ".attn2." in k}
    torch.save({"state_dict": partial, "global_step": 1000}, str(tmp_path / "uce.pt"))
    conv = convert_to_lora(str(tmp_path / "uce.pt"), folder, str(tmp_path / "out.safetensors"), rank=DELTA_RANK)
    lora, _ = lora_io.load_lora(conv.path)
    assert conv.max_error < 1e-4 and lora and all(".attn2." in m for m in lora) and not conv.not_in_lora
    merged = _apply(unet, conv.path)
    for key in (k for k in tuned if ".attn2." in k):
        assert (merged[key] - tuned[key]).abs().max() < 1e-5, key


_CALLED = []


def _record(*args):
    _CALLED.append(args)


class Payload:
    """A custom class in a pickle: ``weights_only`` must refuse it without building it."""

    def __reduce__(self):
        return _record, ("unpickled",)


def test_a_pickle_with_a_custom_class_is_refused_and_never_run(tmp_path):
    path = str(tmp_path / "esd.pt")
    torch.save({"conv_in.weight": torch.zeros(2, 2), "extra": Payload()}, path)
    with pytest.raises(ModelFileError, match="'esd.pt' is a pickle that holds more than plain tensors") as err:
        read_weights(path)
    assert "test_convert._record" in str(err.value) and "\n" not in str(err.value)  # names what it refused
    assert _CALLED == []


def test_a_pickle_that_is_not_a_dict_of_tensors_is_refused(tmp_path):
    torch.save([torch.zeros(2)], str(tmp_path / "list.pt"))
    with pytest.raises(ModelFileError, match="'list.pt' holds a list, not a dict of named tensors"):
        read_weights(str(tmp_path / "list.pt"))
    torch.save({"conv_in.weight": torch.zeros(2), "lr": 1e-5}, str(tmp_path / "mixed.pt"))
    with pytest.raises(ModelFileError, match="'mixed.pt' has 'lr' = a float, not a tensor"):
        read_weights(str(tmp_path / "mixed.pt"))
    with open(tmp_path / "junk.bin", "wb") as f:
        f.write(pickle.dumps("x")[:3])
    with pytest.raises(ModelFileError, match="'junk.bin' could not be read as a PyTorch weights file of plain tensors"):
        read_weights(str(tmp_path / "junk.bin"))


def test_a_file_for_another_base_is_refused_with_one_sentence(toy, tmp_path):
    from erasekit.toyworld.model import build_toy_pipeline

    folder, _ = toy
    other = build_toy_pipeline(seed=1).unet  # the full-size toy: the same names, twice the widths
    save_file(tuned_weights(other), str(tmp_path / "other.safetensors"))
    with pytest.raises(ArchitectureError, match=r"'other.safetensors' was fine-tuned from another model: its "
                                                r"'[\w.]+' is \[[\d, ]+\], the base model's \[[\d, ]+\]; "
                                                "pass the model it was fine-tuned from with --base"):
        convert_to_lora(str(tmp_path / "other.safetensors"), folder, str(tmp_path / "out.safetensors"))
    assert not os.path.exists(tmp_path / "out.safetensors")
    save_file({"down_blocks.9.resnets.0.conv1.weight": torch.zeros(2)}, str(tmp_path / "alien.safetensors"))
    with pytest.raises(ArchitectureError, match="'alien.safetensors' has the weight 'down_blocks.9.*not a UNet fine-tuned"):
        convert_to_lora(str(tmp_path / "alien.safetensors"), folder, str(tmp_path / "out.safetensors"))


def test_a_lora_an_unchanged_unet_and_a_damaged_file_are_refused(toy, tmp_path):
    folder, unet = toy
    lora = {"unet.conv_in": lora_io.LoraWeights(torch.zeros(1, 12, 3, 3), torch.zeros(32, 1, 1, 1), 1.0)}
    path = lora_io.save_lora(lora, str(tmp_path / "a-lora.safetensors"), checkpoints.toy(64), model_card=False)
    with pytest.raises(ModelFileError, match="'a-lora.safetensors' is already a LoRA; load it directly"):
        convert_to_lora(path, folder, str(tmp_path / "out.safetensors"))
    save_file(unet.state_dict(), str(tmp_path / "same.safetensors"))
    with pytest.raises(ModelFileError, match="'same.safetensors' does not differ from the base model"):
        convert_to_lora(str(tmp_path / "same.safetensors"), folder, str(tmp_path / "out.safetensors"))
    with open(tmp_path / "same.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelFileError, match="same.safetensors' is not a valid safetensors file"):
        convert_to_lora(str(tmp_path / "same.safetensors"), folder, str(tmp_path / "out.safetensors"))


def test_the_cli_converts_and_refuses_in_one_line(toy, tmp_path, capsys):
    from trainer.cli import main

    folder, unet = toy
    save_file(tuned_weights(unet), str(tmp_path / "ncd.safetensors"))
    out = str(tmp_path / "ncd-lora.safetensors")
    assert main(["convert", str(tmp_path / "ncd.safetensors"), "--base", folder, "--out", out, "--rank", "3",
                 "--method", "ncd", "--concept", "red circle"]) == 0
    printed = capsys.readouterr().out
    assert "at rank 3" in printed and "max 0.0000" in printed and "worst:" in printed
    assert checkpoints.read_header(out)[1]["erasekit.method"] == "ncd"
    torch.save({"x": Payload()}, str(tmp_path / "evil.pt"))
    assert main(["convert", str(tmp_path / "evil.pt"), "--base", folder, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'evil.pt' is a pickle that holds more than plain tensors") and err.count("\n") == 1


def test_a_diffusers_unet_folder_converts(toy, tmp_path):
    import copy

    folder, unet = toy
    tuned = copy.deepcopy(unet)
    tuned.load_state_dict(tuned_weights(unet, seed=5))
    tuned.save_pretrained(str(tmp_path / "release" / "unet"))  # an NCD release: a diffusers folder's unet/
    conv = convert_to_lora(str(tmp_path / "release"), folder, str(tmp_path / "out.safetensors"), rank=DELTA_RANK)
    assert conv.max_error < 1e-4
    assert checkpoints.read_header(conv.path)[1]["erasekit.source_file"] == "release"
