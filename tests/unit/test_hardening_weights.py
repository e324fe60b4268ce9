"""LoRAs, guideline embeddings and model folders are checked against what they claim to be: a
damaged one is refused with one sentence naming the file, never loaded, never unpickled."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from erasekit import checkpoints, lora_io, models
from erasekit.dag.guideline import FORMAT, GuidelineEmbedding
from erasekit.errors import ErasekitError, ModelFileError

K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _kohya(tmp_path, down=None, up=None, alpha=None, extra=None) -> str:
    """A one-module kohya LoRA file: down [4, 32], up [64, 4], alpha 4, unless told otherwise."""
    tensors = {f"{K}.lora_down.weight": torch.randn(4, 32) if down is None else down,
               f"{K}.lora_up.weight": torch.randn(64, 4) if up is None else up,
               f"{K}.alpha": torch.tensor(4.0) if alpha is None else alpha, **(extra or {})}
    save_file(tensors, str(tmp_path / "erase.safetensors"))
    return str(tmp_path / "erase.safetensors")


def _nan(*shape):
    t = torch.randn(*shape)
    t[0, 0] = math.nan
    return t


@pytest.mark.parametrize("case, kwargs, message", [
    ("NaN down", dict(down=_nan(4, 32)), "NaN or infinite values in '.*lora_down.weight'"),
    ("infinite up", dict(up=torch.full((64, 4), math.inf)), "NaN or infinite values in '.*lora_up.weight'"),
    ("infinite alpha", dict(alpha=torch.tensor(math.inf)), "alpha inf .*finite positive number"),
    ("NaN alpha", dict(alpha=torch.tensor(math.nan)), "alpha nan .*finite positive number"),
    ("zero alpha", dict(alpha=torch.tensor(0.0)), "alpha 0.0 .*finite positive number"),
    ("negative alpha", dict(alpha=torch.tensor(-4.0)), "alpha -4.0 .*finite positive number"),
    ("alpha not one number", dict(alpha=torch.ones(2)), r"'.*\.alpha' of shape \[2\].*not one number"),
    ("integer weights", dict(down=torch.ones(4, 32, dtype=torch.int32)), "as int32, not floating point"),
    ("ranks disagree", dict(up=torch.randn(64, 3)), r"down \[4, 32\], up \[64, 3\], whose ranks disagree"),
    ("conv down, linear up", dict(down=torch.randn(4, 32, 3, 3)), "a LoRA pair is down \\[r, in\\]"),
    ("conv up not 1x1", dict(down=torch.randn(4, 32, 3, 3), up=torch.randn(64, 4, 3, 3)), "ranks disagree"),
    ("rank 0", dict(down=torch.randn(0, 32), up=torch.randn(64, 0)), "a LoRA pair is down"),
    ("up without down", dict(extra={"lora_unet_conv_in.lora_up.weight": torch.randn(8, 4)}),
     "'lora_unet_conv_in.lora_up.weight' without its 'lora_down.weight'"),
])
def test_a_damaged_kohya_lora_is_refused(tmp_path, case, kwargs, message):
    path = _kohya(tmp_path, **kwargs)
    with pytest.raises(ModelFileError, match="The LoRA file 'erase.safetensors' .*" + message) as err:
        lora_io.load_lora(path)
    assert "\n" not in str(err.value)


def test_a_kohya_lora_with_an_integer_alpha_and_half_weights_loads(tmp_path):
    """kohya's trainer stores an integer alpha when none was given; fp16 / bf16 weights are common."""
    path = _kohya(tmp_path, down=torch.randn(4, 32).half(), up=torch.randn(64, 4).bfloat16(), alpha=torch.tensor(2))
    (w,) = lora_io.load_lora(path)[0].values()
    assert w.alpha == 2.0 and w.rank == 4


def _peft(tmp_path, tensors, adapter=None) -> str:
    meta = {"format": "pt", **({"lora_adapter_metadata": adapter} if adapter is not None else {})}
    save_file(tensors, str(tmp_path / "pytorch_lora_weights.safetensors"), metadata=meta)
    return str(tmp_path)


P = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.mark.parametrize("case, tensors, adapter, message", [
    ("B without A", {f"{P}.lora_A.weight": torch.randn(4, 32), f"{P}.lora_B.weight": torch.randn(64, 4),
                     "unet.conv_in.lora_B.weight": torch.randn(8, 4)}, None,
     "'unet.conv_in.lora_B.weight' without its 'lora_A.weight'"),
    ("metadata not JSON", {f"{P}.lora_A.weight": torch.randn(4, 32), f"{P}.lora_B.weight": torch.randn(64, 4)},
     "{unet.r: 4", "unreadable metadata 'lora_adapter_metadata'"),
    ("metadata nested too deep", {f"{P}.lora_A.weight": torch.randn(4, 32), f"{P}.lora_B.weight": torch.randn(64, 4)},
     "[" * 100_000 + "]" * 100_000, "unreadable metadata 'lora_adapter_metadata'"),
    ("alpha not a number", {f"{P}.lora_A.weight": torch.randn(4, 32), f"{P}.lora_B.weight": torch.randn(64, 4)},
     json.dumps({"unet.r": 4, "unet.lora_alpha": "eight"}), "unreadable alpha for 'unet.down_blocks"),
    ("infinite alpha", {f"{P}.lora_A.weight": torch.randn(4, 32), f"{P}.lora_B.weight": torch.randn(64, 4)},
     json.dumps({"unet.r": 4, "unet.lora_alpha": math.inf}), "alpha inf .*finite positive"),
    ("NaN weights", {f"{P}.lora_A.weight": _nan(4, 32), f"{P}.lora_B.weight": torch.randn(64, 4)}, None,
     "NaN or infinite values"),
])
def test_a_damaged_peft_lora_is_refused(tmp_path, case, tensors, adapter, message):
    with pytest.raises(ModelFileError, match="'pytorch_lora_weights.safetensors' .*" + message):
        lora_io.load_lora(_peft(tmp_path, tensors, adapter))


def test_a_one_dimensional_down_is_named_not_a_traceback(tmp_path):
    path = _kohya(tmp_path, down=torch.randn(4))
    lora_io.check_compatible(path, checkpoints.sd_v1(32))  # reads shapes only: leaves the damage to load_lora
    with pytest.raises(ModelFileError, match="a LoRA pair is down"):
        lora_io.load_lora(path)


# ----------------------------------------------------------------------------- guideline embeddings


def _guideline(tmp_path, tokens, sink, contrast=None, **meta) -> str:
    tensors = {"guideline.tokens": tokens, "guideline.sink": sink}
    if contrast is not None:
        tensors["guideline.contrast"] = contrast
    metadata = {"erasekit.format": FORMAT, "concept": "x", "architecture": "toy", "detect_gate": "0.5",
                "detect_floor": "0.2", **meta}
    save_file(tensors, str(tmp_path / "g.safetensors"), metadata=metadata)
    return str(tmp_path / "g.safetensors")


@pytest.mark.parametrize("case, parts, message", [
    ("NaN token", dict(tokens=_nan(2, 8)), "NaN or infinite values in 'guideline.tokens'"),
    ("infinite sink", dict(sink=torch.full((8,), math.inf)), "NaN or infinite values in 'guideline.sink'"),
    ("NaN contrast", dict(contrast=_nan(1, 8)), "NaN or infinite values in 'guideline.contrast'"),
    ("all tokens zero", dict(tokens=torch.zeros(3, 8)), "3 guideline token\\(s\\), all zero, which detect nothing"),
    ("integer tokens", dict(tokens=torch.ones(2, 8, dtype=torch.int64)), "'guideline.tokens' as int64, not floating"),
    ("integer sink", dict(sink=torch.ones(8, dtype=torch.uint8)), "'guideline.sink' as uint8, not floating"),
    ("tokens 1-D", dict(tokens=torch.randn(8)), r"'guideline.tokens' of shape \[8\], not \[K, D\]"),
    ("tokens 3-D", dict(tokens=torch.randn(1, 2, 8)), r"'guideline.tokens' of shape \[1, 2, 8\]"),
    ("no tokens", dict(tokens=torch.randn(0, 8)), "has no guideline tokens"),
    ("sink 2-D", dict(sink=torch.randn(1, 8)), r"'guideline.sink' of shape \[1, 8\], not \[D\]"),
    ("contrast 1-D", dict(contrast=torch.randn(8)), r"'guideline.contrast' of shape \[8\]"),
])
def test_a_damaged_guideline_embedding_is_refused(tmp_path, case, parts, message):
    tensors = {"tokens": torch.randn(2, 8), "sink": torch.randn(8), **parts}
    path = _guideline(tmp_path, **tensors)
    with pytest.raises(ModelFileError, match="g.safetensors' .*" + message) as err:
        GuidelineEmbedding.load(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, text", [
    ("detect_schedule", json.dumps([[math.nan, 0.6], [500, 0.5]])),  # a timestep that is not a number
    ("detect_schedule", "[" * 100_000 + "]" * 100_000),
    ("info", "[" * 100_000 + "]" * 100_000),
    ("info", "[1, 2]"),
    ("contrast_phrases", json.dumps({"a": 1})),
])
def test_damaged_guideline_metadata_is_refused(tmp_path, key, text):
    path = _guideline(tmp_path, torch.randn(2, 8), torch.randn(8), **{key: text})
    with pytest.raises(ModelFileError, match=f"g.safetensors' .*'{key}'"):
        GuidelineEmbedding.load(path)


def test_a_sound_guideline_embedding_in_half_precision_loads(tmp_path):
    emb = GuidelineEmbedding.load(_guideline(tmp_path, torch.randn(2, 8).half(), torch.randn(8).half(),
                                             torch.zeros(1, 8).half()), checkpoints.toy(8))
    assert emb.n_tokens == 2 and emb.contrast.shape == (1, 8)


# ----------------------------------------------------------------------------- model folders: safetensors only


@pytest.fixture
def no_unpickling(monkeypatch):
    """torch.load records its calls and refuses: a test passes only if nothing was unpickled."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


def _tokenizer():
    from transformers import AutoTokenizer

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return AutoTokenizer.from_pretrained(os.path.join(repo, "models", "toy", "tokenizer"))


def _pickle_only(folder, part: str, weights: str, stray: bool) -> None:
    """Replace ``folder/part``'s safetensors weights by a pickle ``weights`` (and a stray safetensors file)."""
    for name in os.listdir(os.path.join(folder, part)):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(folder, part, name))
    torch.save({"conv_in.weight": torch.zeros(1)}, os.path.join(folder, part, weights))
    if stray:  # a folder that looks safe at a glance: the loader must still not fall back to the pickle
        save_file({"x": torch.zeros(1)}, os.path.join(folder, part, "notes.safetensors"))


@pytest.mark.parametrize("stray", [False, True], ids=["bin only", "bin beside another safetensors"])
def test_a_diffusers_folder_with_pickled_weights_is_refused_not_unpickled(tmp_path, no_unpickling, stray):
    from erasekit import tiny

    folder = str(tmp_path / "sd1")
    tiny.save_sd1_folder(folder, _tokenizer())
    _pickle_only(folder, "unet", "diffusion_pytorch_model.bin", stray)
    with pytest.raises(ModelFileError, match="sd1'") as err:
        models.load(folder)
    assert ("'diffusion_pytorch_model.bin', a pickle file" in str(err.value)) != stray
    assert "\n" not in str(err.value) and no_unpickling == []


@pytest.mark.parametrize("part, weights", [("unet", "diffusion_pytorch_model.bin"), ("text_encoder", "pytorch_model.bin")])
@pytest.mark.parametrize("stray", [False, True], ids=["bin only", "bin beside another safetensors"])
def test_a_toy_folder_with_pickled_weights_is_refused_not_unpickled(tmp_path, no_unpickling, part, weights, stray):
    from erasekit.toyworld.model import build_toy_pipeline, load_toy_pipeline, save_toy_pipeline

    folder = save_toy_pipeline(build_toy_pipeline(seed=0, tiny=True), tmp_path / "toy")
    _pickle_only(str(folder), part, weights, stray)
    with pytest.raises(ModelFileError, match="toy model folder '.*toy'"):
        load_toy_pipeline(folder)
    assert no_unpickling == []


def test_an_extracted_lora_of_diverged_weights_is_refused():
    from erasekit.lora_extract import extract_lora

    original = {"a.weight": torch.randn(8, 8)}
    with pytest.raises(ErasekitError, match="'a.weight' has NaN or infinite values"):
        extract_lora(original, {"a.weight": _nan(8, 8)}, rank=2)


def test_a_truncated_weights_file_in_a_diffusers_folder_is_named(tmp_path):
    from erasekit import tiny

    folder = str(tmp_path / "sd1")
    tiny.save_sd1_folder(folder, _tokenizer())
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)  # an interrupted download
    with pytest.raises(ModelFileError, match="'unet' weights file '.*diffusion_pytorch_model.safetensors' is not a valid"):
        models.load(folder)
