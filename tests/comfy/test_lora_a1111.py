"""An exported kohya LoRA, applied by A1111's LoRA rules, does what the merged peft LoRA does.

A1111 (AUTOMATIC1111/stable-diffusion-webui, ``extensions-builtin/Lora``) never sees diffusers
module names: it renames every ``lora_unet_*`` / ``lora_te_*`` key to the module name of the
original LDM model (``networks.py``: ``convert_diffusers_name_to_compvis``), looks that up among
the LDM modules named with "." -> "_" (``assign_network_names_to_compvis_modules``) and adds
``multiplier * alpha / rank * up @ down`` to the module's weight (``network_lora.py``,
``network.py``: ``calc_scale`` / ``finalize_updown``, ``lyco_helpers.py``:
``rebuild_conventional``). The key rules are re-implemented here (not imported: A1111 is not
installed) and run against real LDM module names: ComfyUI's ``UNetModel`` is the LDM UNet with
the same module names, and ComfyUI's SD1 CLIP has the HF ``transformer.text_model...`` names of
A1111's ``FrozenCLIPEmbedder``.

A1111's index arithmetic is SD1's (2 resnets per down level, 3 per up level), so the model here
is the tiny SD1 layout of :mod:`erasekit.tiny` with ``layers_per_block=2`` as in SD1.5 (the
default tiny model has 1, which A1111's rules would map onto the wrong blocks).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from erasekit import checkpoints, lora_io, tiny
from erasekit.bench.lora import TE_TARGETS, add_random_lora, roundtrip_inputs
from erasekit.erase.engine import unet_lora_targets
from tools.comfy_headless import from_pack

# ------------------------------------------------------------------ A1111's rules, re-implemented

# diffusers resnet part -> LDM ResBlock part (networks.py: suffix_conversion["resnets"]); any other
# remainder (attention paths: proj_in, transformer_blocks_0_attn1_to_q, ...) is kept as it is.
_RESNET_PART = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _part(kind: str, rest: str) -> str:
    return _RESNET_PART.get(rest, rest) if kind == "resnets" else rest


def _slot(kind: str) -> int:
    return 1 if kind == "attentions" else 0  # an LDM block holds [ResBlock, SpatialTransformer]


# (pattern, LDM name from the groups); tried in this order with re.match, as A1111 does.
_RULES = [
    (r"lora_unet_conv_in(.*)", lambda r: f"diffusion_model_input_blocks_0_0{r}"),
    (r"lora_unet_conv_out(.*)", lambda r: f"diffusion_model_out_2{r}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda n, r: f"diffusion_model_time_embed_{2 * int(n) - 2}{r}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda b, k, j, r: f"diffusion_model_input_blocks_{1 + 3 * int(b) + int(j)}_{_slot(k)}_{_part(k, r)}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda k, j, r: f"diffusion_model_middle_block_{1 if k == 'attentions' else 2 * int(j)}_{_part(k, r)}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda b, k, j, r: f"diffusion_model_output_blocks_{3 * int(b) + int(j)}_{_slot(k)}_{_part(k, r)}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda b: f"diffusion_model_input_blocks_{3 + 3 * int(b)}_0_op"),
    # up_blocks.0 of SD1 has no attention, so its upsampler is the 2nd module of its block, else the 3rd
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda b: f"diffusion_model_output_blocks_{2 + 3 * int(b)}_{2 if int(b) > 0 else 1}_conv"),
    (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda n, r: f"transformer_text_model_encoder_layers_{n}_{r}"),
]
_RULES = [(re.compile(p), f) for p, f in _RULES]


def a1111_compvis_name(key: str) -> str:
    """LDM module name (``.`` -> ``_``) that A1111 gives a kohya key of an SD1 model.

    Mirrors ``convert_diffusers_name_to_compvis(key, is_sd2=False)`` of A1111's
    ``extensions-builtin/Lora/networks.py`` (v1.6 - v1.10; earlier ``lora.py``): fixed index
    arithmetic for SD1's block layout, ``suffix_conversion`` for resnet parts, CLIP encoder layers
    under ``transformer_``; a key no rule matches is returned unchanged.
    """
    for pattern, build in _RULES:
        m = pattern.match(key)
        if m:
            return build(*m.groups())
    return key


def a1111_find_module(key: str, layers: dict):
    """``(sd_key, module or None)`` as ``load_network`` of A1111's ``networks.py`` finds it: the
    converted name, else the key with ``lora_unet`` -> ``diffusion_model`` (LoRAs already in LDM
    names), else ``lora_te1_text_model`` -> ``transformer_text_model``. Its ``re_x_proj`` fallback
    is left out: it only serves OpenCLIP's fused MultiheadAttention (SD2/SDXL), which SD1 lacks."""
    name = a1111_compvis_name(key)
    if name in layers:
        return name, layers[name]
    if "lora_unet" in key:
        name = key.replace("lora_unet", "diffusion_model")
    elif "lora_te1_text_model" in key:
        name = key.replace("lora_te1_text_model", "transformer_text_model")
    return name, layers.get(name)


def a1111_layers(root) -> dict:
    """``assign_network_names_to_compvis_modules``: every module by its dotted name, . -> _."""
    return {name.replace(".", "_"): module for name, module in root.named_modules()}


def a1111_group(sd: dict) -> dict:
    """``{kohya key: {"lora_down.weight": ..., "lora_up.weight": ..., "alpha": ...}}`` (split at the first '.')."""
    groups: dict = {}
    for full, tensor in sd.items():
        key, _, part = full.partition(".")
        groups.setdefault(key, {})[part] = tensor
    return groups


def a1111_updown(w: dict, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The weight change A1111 adds (``NetworkModuleLora.calc_updown`` + ``finalize_updown``):
    ``up @ down`` on the flattened matrices, shaped [out, in(, kh, kw)] from down's kernel, times
    ``alpha / rank`` (1 without alpha) and the multiplier."""
    up, down = w["lora_up.weight"].float(), w["lora_down.weight"].float()
    rank = down.shape[0]
    if weight.dim() == 4:  # Conv2d: down keeps its kernel (a 2-d down becomes 1x1)
        down = down.reshape(rank, -1, 1, 1) if down.dim() == 2 else down
        shape = [up.shape[0], *down.shape[1:]]
    else:  # Linear: both flattened to matrices
        down = down.reshape(rank, -1)
        shape = [up.shape[0], down.shape[1]]
    updown = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(shape)
    assert updown.numel() == weight.numel(), f"A1111 cannot add {list(updown.shape)} to {list(weight.shape)}"
    scale = float(w["alpha"]) / rank if "alpha" in w else 1.0
    return updown.reshape(weight.shape) * scale * multiplier


def a1111_apply(groups: dict, layers: dict, multiplier: float) -> list[str]:
    """Add every matched module's change to its weight, in place; return the unmatched keys."""
    unmatched, seen = [], set()
    with torch.no_grad():
        for key, w in groups.items():
            sd_key, module = a1111_find_module(key, layers)
            if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
                unmatched.append(f"{key} -> {sd_key}")
                continue
            assert sd_key not in seen, f"two LoRA keys land on {sd_key}"
            seen.add(sd_key)
            module.weight += a1111_updown(w, module.weight, multiplier).to(module.weight)
    return unmatched


def test_conversion_rules_on_known_sd1_names():
    """Spot checks against SD1.5's real diffusers <-> LDM names (layout of the released models)."""
    cases = {
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k":
            "diffusion_model_input_blocks_2_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_down_blocks_2_resnets_0_conv_shortcut": "diffusion_model_input_blocks_7_0_skip_connection",
        "lora_unet_down_blocks_3_resnets_1_time_emb_proj": "diffusion_model_input_blocks_11_0_emb_layers_1",
        "lora_unet_down_blocks_1_downsamplers_0_conv": "diffusion_model_input_blocks_6_0_op",
        "lora_unet_mid_block_resnets_1_conv2": "diffusion_model_middle_block_2_out_layers_3",
        "lora_unet_mid_block_attentions_0_proj_out": "diffusion_model_middle_block_1_proj_out",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "diffusion_model_output_blocks_2_1_conv",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj":
            "diffusion_model_output_blocks_11_1_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_up_blocks_2_upsamplers_0_conv": "diffusion_model_output_blocks_8_2_conv",
        "lora_unet_time_embedding_linear_2": "diffusion_model_time_embed_2",
        "lora_te_text_model_encoder_layers_11_mlp_fc2": "transformer_text_model_encoder_layers_11_mlp_fc2",
        "lora_te_text_model_embeddings_token_embedding": "lora_te_text_model_embeddings_token_embedding",
    }
    assert {k: a1111_compvis_name(k) for k in cases} == cases


# ------------------------------------------------------------------ the models


def _merged(model):
    """A deep copy with its peft LoRA merged into the base weights (peft ``merge``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return model


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Tiny SD1.5-layout UNet (2 resnets per level) and text encoder with random peft LoRAs on every
    layer A1111 has a rule for (the trainer's ``all`` preset plus conv_in/out and the time
    embedding), lora_alpha != r, an alpha and a rank pattern; exported as a kohya file."""
    from diffusers import UNet2DConditionModel

    parts = tiny.build("sd_v1", seed=0)
    torch.manual_seed(0)
    base_unet = UNet2DConditionModel(**{**tiny.unet_config("sd_v1"), "layers_per_block": 2}).eval()
    targets = unet_lora_targets(base_unet, "all") + ["conv_in", "conv_out", "time_embedding.linear_1",
                                                     "time_embedding.linear_2"]
    unet = add_random_lora(copy.deepcopy(base_unet), targets, seed=1, r=4, lora_alpha=8.0,
                           alpha_pattern={"to_k": 2.0}, rank_pattern={"conv1": 2})
    te = add_random_lora(copy.deepcopy(parts["text_encoder"]), TE_TARGETS + ["fc2"], seed=2, r=2, lora_alpha=3.0)
    lora = lora_io.lora_from_peft(unet=unet, text_encoder=te)
    path = lora_io.save_lora(lora, tmp_path_factory.mktemp("a1111") / "erase-a1111.safetensors",
                             checkpoints.sd_v1(tiny.TINY_WIDTH), erased_concept="random", method="test",
                             model_card=False)
    import safetensors.torch

    inputs = roundtrip_inputs(seed=0)
    with torch.no_grad():
        unet_ref = _merged(unet)(inputs["x"], inputs["t"], encoder_hidden_states=inputs["ctx"]).sample
        unet_base = base_unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["ctx"]).sample
        text_ref = _merged(te)(inputs["ids"]).last_hidden_state
        text_base = parts["text_encoder"](inputs["ids"]).last_hidden_state
    return {"base_unet": base_unet, "base_te": parts["text_encoder"], "scheduler": parts["scheduler"],
            "n_unet": sum(m.startswith("unet.") for m in lora), "n_te": sum(m.startswith("text_encoder.") for m in lora),
            "groups": a1111_group(safetensors.torch.load_file(path)), "inputs": inputs,
            "unet_ref": unet_ref, "unet_base": unet_base, "text_ref": text_ref, "text_base": text_base}


def test_a1111_rules_apply_the_unet_lora_like_the_merged_weights(comfy, case):
    import comfy.model_management

    load_diffusers_unet = from_pack("nodes.comfy_bridge", 'load_diffusers_unet')

    groups = {k: w for k, w in case["groups"].items() if k.startswith("lora_unet_")}
    assert len(groups) == case["n_unet"] > 200
    patcher = load_diffusers_unet(case["base_unet"], case["scheduler"])
    layers = a1111_layers(patcher.model)  # BaseModel.diffusion_model -> "diffusion_model_..."
    inputs = case["inputs"]
    try:
        comfy.model_management.load_models_gpu([patcher])
        with torch.no_grad():
            before = patcher.model.diffusion_model(inputs["x"], timesteps=inputs["t"], context=inputs["ctx"]).float()
        assert (before - case["unet_base"]).abs().max() < 1e-4  # same base model on both sides
        unmatched = a1111_apply(groups, layers, multiplier=1.0)
        assert unmatched == []
        with torch.no_grad():
            after = patcher.model.diffusion_model(inputs["x"], timesteps=inputs["t"], context=inputs["ctx"]).float()
    finally:
        comfy.model_management.unload_all_models()
    diff = float((after - case["unet_ref"]).abs().max())
    print(f"A1111-rule UNet vs peft-merged UNet: max abs diff {diff:.3g}")
    assert diff <= 1e-3
    # not trivially: the LoRA moves the output far more than the tolerance
    assert (case["unet_ref"] - case["unet_base"]).abs().max() > 0.05
    assert (after - before).abs().max() > 0.05


def test_a1111_rules_apply_the_text_encoder_lora_like_the_merged_weights(comfy, case):
    from tools.lora_roundtrip_comfy import comfy_sd1_clip

    groups = {k: w for k, w in case["groups"].items() if k.startswith("lora_te")}
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in groups)  # SD1: lora_te_, with text_model
    assert len(groups) == case["n_te"] > 0
    clip = comfy_sd1_clip(case["base_te"])
    layers = a1111_layers(clip.cond_stage_model.clip_l)  # like FrozenCLIPEmbedder: transformer.text_model...
    tokens = {"l": [[(int(i), 1.0) for i in case["inputs"]["ids"][0]]]}
    before = clip.encode_from_tokens(tokens).float()
    assert (before - case["text_base"]).abs().max() < 1e-4
    assert a1111_apply(groups, layers, multiplier=1.0) == []
    after = clip.encode_from_tokens(tokens).float()
    diff = float((after - case["text_ref"]).abs().max())
    print(f"A1111-rule text encoder vs peft-merged text encoder: max abs diff {diff:.3g}")
    assert diff <= 1e-3
    assert (case["text_ref"] - case["text_base"]).abs().max() > 0.05
    assert (after - before).abs().max() > 0.05
