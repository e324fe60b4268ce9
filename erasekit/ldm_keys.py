"""Weight names of the original (LDM) single-file layout <-> diffusers names, for the UNet and the VAE.

diffusers converts LDM -> diffusers only (``diffusers.loaders.single_file_utils``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``). The other direction, needed to write
an SD-release-style checkpoint from diffusers modules, is the structural inverse of those rules below;
every map is then run forward through diffusers' own converter and must give back exactly the names it
started from (:func:`_check_round_trip`), so diffusers' converter, which ComfyUI's and A1111's loaders
agree with, stays the one authority and a layout the inverse gets wrong fails loudly instead of writing
a checkpoint that loads scrambled.
"""

from __future__ import annotations

import re

from .errors import ArchitectureError

LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def unet_ldm_names(keys, config: dict) -> dict[str, str]:
    """``{diffusers key: LDM key}`` (without ``model.diffusion_model.``) for a diffusers UNet's state-dict
    keys and ``config``; checked against diffusers' ``convert_ldm_unet_checkpoint``."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ArchitectureError(f"This UNet has a different number of layers per block ({lpb}); only the SD1/SD2/SDXL "
                                "layout (one number for all blocks) has an original single-file layout.")
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    fixed = {}
    for table in DIFFUSERS_TO_LDM_MAPPING["unet"].values():
        fixed.update(table)
    names = {}
    for key in keys:
        if key in fixed:
            names[key] = fixed[key]
            continue
        names[key] = _unet_block_name(key, lpb, up_has_attention)
    _check_round_trip(names, lambda probe: _diffusers_unet(probe, config), "UNet")
    return names


def _unet_block_name(key: str, lpb: int, up_has_attention: list) -> str:
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        side, block, kind, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        index = 1 + block * (lpb + 1) + layer if side == "down" else block * (lpb + 1) + layer
        slot = 1 if kind == "attentions" else 0
        return f"{'input' if side == 'down' else 'output'}_blocks.{index}.{slot}.{_resnet_part(rest) if not slot else rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * (lpb + 1)}.0.op.{m.group(2)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:  # the upsampler follows the resnet, and the attention where the block has one
        block = int(m.group(1))
        return f"output_blocks.{block * (lpb + 1) + lpb}.{2 if up_has_attention[block] else 1}.conv.{m.group(2)}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        if m.group(1) == "attentions":
            return f"middle_block.1.{m.group(3)}"
        return f"middle_block.{2 * int(m.group(2))}.{_resnet_part(m.group(3))}"
    raise ArchitectureError(f"The UNet weight '{key}' has no place in the original single-file layout; this UNet is not "
                            "an SD1/SD2/SDXL-style UNet.")


def _resnet_part(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def vae_ldm_names(keys, config: dict) -> dict[str, str]:
    """``{diffusers key: LDM key}`` (without ``first_stage_model.``) of an ``AutoencoderKL``; checked against
    diffusers' ``convert_ldm_vae_checkpoint``. LDM's attention projections are 1x1 convolutions where
    diffusers' are linear: :func:`vae_to_ldm` reshapes them."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    names = {}
    for key in keys:
        if key in fixed:
            names[key] = fixed[key]
            continue
        part, _, rest = key.partition(".")
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.+)", rest)
        if m:
            side, block, what, tail = m.group(1), int(m.group(2)), m.group(3), m.group(5)
            index = block if side == "down" else n_up - 1 - block  # LDM numbers the decoder's levels bottom-up
            if what.startswith("resnets"):
                tail = tail.replace("conv_shortcut", "nin_shortcut")
                names[key] = f"{part}.{side}.{index}.block.{m.group(4)}.{tail}"
            else:
                names[key] = f"{part}.{side}.{index}.{'downsample' if side == 'down' else 'upsample'}.{tail}"
            continue
        m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
        if m:
            names[key] = f"{part}.mid.block_{int(m.group(1)) + 1}.{m.group(2).replace('conv_shortcut', 'nin_shortcut')}"
            continue
        m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest)
        if m:
            old = dict(_VAE_ATTENTION).get(m.group(1))
            if old is not None:
                names[key] = f"{part}.mid.attn_1.{old}.{m.group(2)}"
                continue
        raise ArchitectureError(f"The VAE weight '{key}' has no place in the original single-file layout; this VAE is "
                                "not Stable Diffusion's AutoencoderKL.")
    _check_round_trip(names, lambda probe: _diffusers_vae(probe, config), "VAE")
    return names


def vae_to_ldm(state_dict: dict, config: dict) -> dict:
    """An ``AutoencoderKL`` state dict in the LDM layout (with ``first_stage_model.``)."""
    names = vae_ldm_names(state_dict, config)
    out = {}
    for key, t in state_dict.items():
        if ".mid_block.attentions." in key and key.endswith(".weight") and t.dim() == 2:
            t = t[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[LDM_VAE + names[key]] = t
    return out


def _diffusers_unet(probe: dict, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint({LDM_UNET + k: v for k, v in probe.items()}, dict(config))


def _diffusers_vae(probe: dict, config: dict) -> dict:
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    # the converter reshapes attention weights, so it gets tensors: each tensor's one value is its key's index
    tensors = {LDM_VAE + ldm: torch.full((1, 1, 1, 1), float(i)) for i, ldm in enumerate(probe)}
    out = convert_ldm_vae_checkpoint(tensors, dict(config))
    names = list(probe.values())
    return {k: names[int(v.flatten()[0])] for k, v in out.items()}


def _check_round_trip(names: dict, forward, what: str) -> None:
    """``forward({ldm: diffusers})`` (diffusers' converter) must return ``{diffusers: diffusers}`` for every key."""
    if len(set(names.values())) != len(names):
        raise ArchitectureError(f"Two {what} weights would share one name in the original single-file layout; this "
                                f"{what} does not have an SD-style layout.")
    back = forward({ldm: key for key, ldm in names.items()})
    wrong = next((k for k in names if back.get(k) != k), None)
    if wrong is not None or len(back) != len(names):
        wrong = wrong or next(iter(set(back) - set(names)))
        raise ArchitectureError(f"diffusers' own converter does not map the {what} weight '{wrong}' back to itself from "
                                f"'{names.get(wrong)}'; this {what} layout cannot be written as a single-file checkpoint.")
