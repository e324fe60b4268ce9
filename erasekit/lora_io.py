"""LoRA files that ComfyUI, A1111/Forge and diffusers all load: export, import, check, extract.

In memory a LoRA is a :data:`Lora` dict ``{module: LoraWeights(down, up, alpha)}``; a module's
weight changes by ``strength * alpha / rank * up @ down``. Module names are diffusers paths with
the component in front and CLIP's classic ``text_model.``:
``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2.text_model...``.

On disk (:func:`save_lora`):
- kohya (default; read by ComfyUI, A1111/Forge and diffusers): ``lora_unet_<path, . -> _>``,
  ``lora_te_`` (SD1/2) or ``lora_te1_`` / ``lora_te2_`` (SDXL), each with ``.lora_down.weight``
  [r, in(, kh, kw)], ``.lora_up.weight`` [out, r(, 1, 1)] and a scalar ``.alpha``; kohya ``ss_*``,
  modelspec 1.0.1 and ``erasekit.*`` metadata; a model card ``<name>.md`` beside it (and, for a web
  UI's ``models/Lora``, its card ``<name>.json``: :mod:`erasekit.webui_card`).
- peft: diffusers' ``<dir>/pytorch_lora_weights.safetensors`` (``unet.<path>.lora_A.weight``) with
  the adapter config in ``lora_adapter_metadata``, for ``pipe.load_lora_weights(dir)`` only
  (ComfyUI maps diffusers attention LoRAs only under ``.processor.`` names and reads no alpha).

What diffusers' ``convert_state_dict_to_kohya`` gets wrong and this fixes (recipe:
/work/shared/recipes/lora-format.md): alpha is what peft applies (``scaling * r``: ``lora_alpha``,
``alpha_pattern``, ``rank_pattern``, rsLoRA), not the rank; CLIP names get back the ``text_model.``
that transformers 5 dropped (ComfyUI and A1111 map only ``lora_te_text_model_encoder_...``).

A1111/Forge (``extensions-builtin/Lora/networks.py``, ``convert_diffusers_name_to_compvis``) map
diffusers UNet names by SD1-layout arithmetic (2 resnets per level), which fits SDXL too except
``up_blocks.0.upsamplers.0.conv`` and ``add_embedding.*``; their OpenCLIP encoders (SD2, SDXL's
second) fuse q/k/v, so a layer changes only with all of q, k, v and out_proj (:func:`a1111_skipped`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections import Counter
from typing import NamedTuple

from . import checkpoints
from .checkpoints import Architecture
from .errors import ArchitectureError, ErasekitError, ModelFileError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PEFT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
IMPLEMENTATION = "https://github.com/erasekit/erasekit"
FAMILY_TITLES = {"sd_v1": "Stable Diffusion 1.x", "sd_v2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
                 "toy": "Erasekit toy model"}
_RESOLUTION = {"sd_v1": "512x512", "sd_v2": "512x512", "sdxl": "1024x1024", "toy": "128x128"}
_LICENSE = {"sd_v1": "creativeml-openrail-m", "sd_v2": "openrail++", "sdxl": "openrail++"}
_WIDTH_FAMILY = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl"}  # cross-attention width of real releases


class LoraWeights(NamedTuple):
    """One module's LoRA: ``down`` [r, in] or [r, in, kh, kw], ``up`` [out, r] or [out, r, 1, 1]."""

    down: object
    up: object
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self):
        """The weight change at strength 1: ``alpha / r * up @ down``, shaped [out, in(, kh, kw)]."""
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return (self.alpha / self.rank) * d.reshape(self.up.shape[0], *self.down.shape[1:])


Lora = dict  # {module name: LoraWeights}


def family(name: str) -> str:
    """``sd_v1`` / ``sd_v2`` / ``sdxl`` / ``toy`` from a base-model name as trainers write it: kohya's
    ``ss_base_model_version`` (``sd_v1``, ``sd_v2_v``, ``sdxl_base_v1-0``), ai-toolkit's (``sd_1.5``,
    ``sd_2.1``, ``sdxl_1.0``), hub spellings (``SD 1.5``, ``SDXL 1.0``) or Architecture.name; else the
    name itself (an unknown family: callers decide by layer widths)."""
    low = name.lower()
    if re.match(r"(sd_?xl|sdxl)[\s._-]?(refiner|turbo)?([\s._-]|base|v?1|$)", low) and "refiner" not in low:
        return "sdxl"
    m = re.match(r"sd[\s._-]?v?([12])(?:[\s._-]?\d)?(?:[\s._-]|$|v|base|512|768)", low)  # sd_v1, sd_1.5, SD 2.1, sd15
    if m:
        return "sd_v1" if m.group(1) == "1" else "sd_v2"
    return "toy" if low == "toy" else name


def canonical_module(component: str, path: str) -> str:
    """``component.path`` with CLIP's ``text_model.`` restored (transformers 5 drops it)."""
    if component != "unet" and path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        path = "text_model." + path
    return f"{component}.{path}"


# ----------------------------------------------------------------------------- from peft


def lora_from_peft(unet=None, text_encoder=None, text_encoder_2=None, adapter_name: str = "default") -> Lora:
    """The LoRA held by peft adapters injected into diffusers/transformers modules.

    Weights come from peft's ``get_peft_model_state_dict``; alpha from each layer's own
    ``scaling`` (alpha = scaling * r), i.e. exactly the strength peft applies, whatever
    ``lora_alpha`` / ``alpha_pattern`` / ``rank_pattern`` / ``use_rslora`` said.
    """
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    lora: Lora = {}
    for component, model in zip(COMPONENTS, (unet, text_encoder, text_encoder_2)):
        if model is None:
            continue
        sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
                if adapter_name in getattr(layer, "lora_embedding_A", {}):
                    raise ValueError(f"LoRA layer '{name}' is an embedding LoRA, which kohya files cannot hold.")
                continue
            path = name.removeprefix("base_model.model.")
            if adapter_name in getattr(layer, "lora_magnitude_vector", {}) or getattr(layer, "lora_bias", {}).get(adapter_name):
                raise ValueError(f"LoRA layer '{path}' uses DoRA or a LoRA bias, which kohya files cannot hold.")
            down, up = sd[f"{path}.lora_A.weight"], sd[f"{path}.lora_B.weight"]
            alpha = float(layer.scaling[adapter_name]) * down.shape[0]
            lora[canonical_module(component, path)] = LoraWeights(down.detach().clone(), up.detach().clone(), alpha)
    if not lora:
        raise ValueError(f"No peft LoRA adapter '{adapter_name}' found in the given modules.")
    return lora


# ----------------------------------------------------------------------------- export


def kohya_key(module: str, architecture: Architecture) -> str:
    """kohya name of a module: ``unet.a.b`` -> ``lora_unet_a_b``, ``text_encoder.x`` -> ``lora_te_x``
    (``lora_te1_x`` for SDXL), ``text_encoder_2.x`` -> ``lora_te2_x``."""
    component, path = module.split(".", 1)
    two_encoders = len(architecture.text_widths) == 2
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if two_encoders else "lora_te_",
              "text_encoder_2": "lora_te2_"}[component]
    return prefix + path.replace(".", "_")


def save_lora(lora: Lora, path: str, architecture: Architecture, *, save_format: str = "kohya",
              erased_concept: str = "", method: str = "", preserved=(), config: dict | None = None,
              title: str | None = None, description: str | None = None, license: str | None = None,
              resolution: str | None = None, base_model: str = "", dtype=None, model_card: bool = True,
              extra_metadata: dict | None = None) -> str:
    """Write ``lora`` for ``architecture``; return the path of the weights file.

    ``path``: the ``.safetensors`` file (kohya) or a folder (peft). Written atomically, with a
    model card beside it (``<name>.md``, or ``README.md`` in the peft folder). ``dtype`` casts
    the tensors (e.g. ``torch.float16``); default: as given. ``extra_metadata``: more ``erasekit.*``
    strings (a converted file's source and extraction error), added after the standard fields.
    """
    import torch

    if save_format not in ("kohya", "peft"):
        raise ValueError(f"save_format must be 'kohya' or 'peft', not '{save_format}'")
    path = os.fspath(path)
    if not lora:
        raise ErasekitError(f"Nothing to write to '{path}': the LoRA has no layers (the weights did not change "
                            "measurably; train longer or with a higher learning rate).")
    if save_format == "kohya":
        file = path if path.endswith(".safetensors") else path + ".safetensors"
        name = os.path.basename(file)[: -len(".safetensors")]
    else:
        file, name = os.path.join(path, PEFT_WEIGHT_NAME), os.path.basename(os.path.normpath(path))
    cast = (lambda t: t.detach().contiguous()) if dtype is None else (lambda t: t.detach().to(dtype).contiguous())
    ranks = Counter(w.rank for w in lora.values())
    alphas = Counter(float(w.alpha) for w in lora.values())
    fam = family(architecture.name)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": str(alphas.most_common(1)[0][0]),
        "ss_base_model_version": architecture.name,
        "ss_v2": str(fam == "sd_v2"),  # A1111 reads "True" as SD2
        "ss_output_name": name,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture.modelspec + "/lora",
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title or name,
        "modelspec.description": description or f"Erases '{erased_concept}' from {architecture.title} ({method}).",
        "modelspec.trigger_phrase": erased_concept,
        "modelspec.date": datetime.datetime.now().isoformat(timespec="seconds"),
        "modelspec.license": license or _LICENSE.get(fam, "see the base model's license"),
        "modelspec.resolution": resolution or _RESOLUTION.get(fam, "512x512"),
        "modelspec.usage_hint": "Load at strength 1.0: the concept is erased while the LoRA is active.",
        "erasekit.method": method,
        "erasekit.erased_concept": erased_concept,
        "erasekit.preserved": json.dumps(list(preserved)),
        "erasekit.config": json.dumps(config or {}, sort_keys=True, default=str),
    }
    if base_model:
        meta["ss_sd_model_name"] = base_model
    meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    conv = [w for w in lora.values() if w.down.dim() == 4 and w.down.shape[-1] > 1]
    if conv:  # kohya LoCon convention for 3x3 convolutions
        conv_alpha = alphas.most_common(1)[0][0] if save_format == "kohya" else conv[0].alpha  # kohya: the file's one alpha
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv[0].rank), "conv_alpha": str(float(conv_alpha))})
    if save_format == "kohya":
        # One alpha for the whole file: a module whose alpha differs gets it folded into up
        # (alpha_i/r * up == alpha/r * (up * alpha_i/alpha)). Same weights in every loader, and it
        # works around diffusers 0.42, whose kohya converter names attention alphas
        # '...processor.to_k_lora.down.weight', so peft ignores them as alpha_pattern keys.
        alpha = alphas.most_common(1)[0][0]
        tensors = {}
        for module, w in lora.items():
            key = kohya_key(module, architecture)
            tensors[f"{key}.lora_down.weight"] = cast(w.down)
            tensors[f"{key}.lora_up.weight"] = cast(w.up if w.alpha == alpha else w.up * (w.alpha / alpha))
            tensors[f"{key}.alpha"] = cast(torch.tensor(alpha))
    else:
        tensors = {f"{m}.lora_A.weight": cast(w.down) for m, w in lora.items()}
        tensors.update({f"{m}.lora_B.weight": cast(w.up) for m, w in lora.items()})
        meta["format"] = "pt"
        meta["lora_adapter_metadata"] = json.dumps(_peft_adapter_metadata(lora), indent=2, sort_keys=True)
    checkpoints.save_file_atomic(tensors, file, meta)
    if model_card:  # written like the weights: a temporary file, then a rename
        card = os.path.join(path, "README.md") if save_format == "peft" else file[: -len(".safetensors")] + ".md"
        checkpoints.write_text_atomic(_model_card(lora, name, architecture, meta, save_format, base_model), card)
    return file


def _peft_adapter_metadata(lora: Lora) -> dict:
    """diffusers' ``lora_adapter_metadata``: a LoraConfig per component, keys ``unet.r`` etc.

    Targets and patterns are written without CLIP's ``text_model.`` so that peft's suffix match
    finds the layers in transformers 4 and 5 alike.
    """
    out = {}
    for component in COMPONENTS:
        mods = {m.split(".", 1)[1].removeprefix("text_model."): w for m, w in lora.items() if m.split(".", 1)[0] == component}
        if not mods:
            continue
        r = Counter(w.rank for w in mods.values()).most_common(1)[0][0]
        a = Counter(float(w.alpha) for w in mods.values()).most_common(1)[0][0]
        cfg = {"r": r, "lora_alpha": a, "target_modules": sorted(mods), "init_lora_weights": True,
               "rank_pattern": {p: w.rank for p, w in mods.items() if w.rank != r},
               "alpha_pattern": {p: float(w.alpha) for p, w in mods.items() if float(w.alpha) != a}}
        out.update({f"{component}.{k}": v for k, v in cfg.items()})
    return out


def a1111_skipped(lora: Lora, architecture: Architecture) -> list[str]:
    """Modules of ``lora`` that A1111/Forge do not apply (see the module docstring)."""
    skipped = []
    if family(architecture.name) == "sdxl":
        skipped += [m for m in lora if m.startswith(("unet.up_blocks.0.upsamplers.", "unet.add_embedding."))]
    if family(architecture.name) in ("sd_v2", "sdxl"):  # OpenCLIP encoders: fused in_proj needs q, k, v, out
        te = "text_encoder" if family(architecture.name) == "sd_v2" else "text_encoder_2"
        for m in lora:
            if m.startswith(te + ".") and ".self_attn." in m:
                base = m.rsplit(".", 1)[0]
                if not all(f"{base}.{p}_proj" in lora for p in "qkv") or f"{base}.out_proj" not in lora:
                    skipped.append(m)
    return skipped


def _model_card(lora, name, architecture, meta, save_format, base_model) -> str:
    n_te = sum(1 for m in lora if not m.startswith("unet."))
    concept, method = meta["erasekit.erased_concept"], meta["erasekit.method"]
    preserved = ", ".join(json.loads(meta["erasekit.preserved"])) or "none given"
    if save_format == "kohya":
        load = (f"- **ComfyUI**: copy `{name}.safetensors` to `models/loras/`, add a *LoraLoader* "
                f"({'*LoraLoaderModelOnly* works: UNet only' if not n_te else 'UNet and CLIP'}), strength 1.0.\n"
                f"- **A1111 / Forge**: copy it to `models/Lora/` and add `<lora:{name}:1>` to the prompt.\n"
                f"- **diffusers**: `pipe.load_lora_weights(folder, weight_name=\"{name}.safetensors\")`.\n")
    else:
        load = (f"- **diffusers**: `pipe.load_lora_weights(\"{name}\")` (this folder).\n"
                "- ComfyUI and A1111/Forge want the kohya file: export again with `save_format=\"kohya\"`.\n")
    extraction = json.loads(meta.get("erasekit.config") or "{}").get("extraction")
    if extraction:
        load += (f"\nExtracted from a full fine-tune by SVD at rank {extraction['rank']}: relative error "
                 f"{extraction['mean_error']:.3f} on average, {extraction['max_error']:.3f} at worst "
                 f"(`{extraction['worst_module']}`); {len(extraction['not_in_lora'])} changed parameter(s) "
                 "(biases, norms, embeddings) cannot be held by a LoRA and are not in it.\n")
    skipped = a1111_skipped(lora, architecture) if save_format == "kohya" else []
    note = (f"\nA1111/Forge skip {len(skipped)} module(s) of this LoRA ({', '.join(skipped[:4])}"
            f"{', ...' if len(skipped) > 4 else ''}); ComfyUI and diffusers apply all of them.\n") if skipped else ""
    return (f"# {meta['modelspec.title']}\n\n{meta['modelspec.description']}\n\n"
            f"| | |\n|---|---|\n| Erased concept | {concept} |\n| Preserved concepts | {preserved} |\n"
            f"| Method | {method} |\n| Base model | {base_model or architecture.title} "
            f"(`{architecture.name}`, `{meta['modelspec.architecture']}`) |\n"
            f"| Rank / alpha | {meta['ss_network_dim']} / {meta['ss_network_alpha']} |\n"
            f"| Modules | {len(lora)} ({len(lora) - n_te} UNet, {n_te} text encoder) |\n"
            f"| Format | {save_format} |\n| Made | {meta['modelspec.date']} with Erasekit |\n\n"
            f"## How to load\n\n{load}{note}\n"
            f"The concept is erased while the LoRA is active (strength 1.0); lower strengths erase less.\n\n"
            f"## License\n\n{meta['modelspec.license']}: the base model's license applies to this derived "
            "work, including its use restrictions.\n")


# ----------------------------------------------------------------------------- import

# Words of diffusers / CLIP / LDM module names that contain "_", to undo kohya's "." -> "_".
_COMPOUND = {
    "final_layer_norm", "conv_norm_out", "time_emb_proj", "down_blocks", "up_blocks", "mid_block",
    "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "conv_in", "conv_out",
    "conv_shortcut", "time_embedding", "linear_1", "linear_2", "add_embedding", "text_model", "self_attn",
    "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2", "token_embedding",
    "position_embedding", "text_projection", "input_blocks", "output_blocks", "middle_block", "in_layers",
    "out_layers", "emb_layers", "skip_connection", "label_emb", "time_embed",
}
_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                 "lora_te2_": "text_encoder_2"}


def _undot(flat: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`` -> dotted diffusers path."""
    parts, out, i = flat.split("_"), [], 0
    while i < len(parts):
        for n in (3, 2, 1):
            word = "_".join(parts[i : i + n])
            if n == 1 or word in _COMPOUND:
                out.append(word)
                i += n
                break
    return ".".join(out)


def load_lora(path: str) -> tuple[Lora, dict]:
    """Read a kohya or PEFT/diffusers LoRA file (or a diffusers LoRA folder): ``(lora, metadata)``.

    Refused with a sentence naming the file: weights that are not floating point or not finite,
    an alpha that is not a finite positive number, a down/up pair whose shapes or ranks disagree,
    half of a pair without the other (:func:`check_values`, :func:`_pair`)."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, PEFT_WEIGHT_NAME)):
        path = os.path.join(path, PEFT_WEIGHT_NAME)
    sd, meta = checkpoints.load_file(path, "LoRA file")
    name = os.path.basename(path)
    check_values(sd, name)
    if any(k.endswith(".lora_down.weight") for k in sd):
        return _kohya_lora(sd, name), meta
    return _peft_lora(sd, meta, name), meta


def _kohya_lora(sd: dict, name: str) -> Lora:
    lora: Lora = {}
    for key in sd:
        if not key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")):
            raise ModelFileError(f"The LoRA file '{name}' has '{key}', a LyCORIS/DoRA part Erasekit does not read; "
                                 "ComfyUI and A1111 load it directly.")
        if key.endswith(".lora_up.weight") and key[: -len("up.weight")] + "down.weight" not in sd:
            raise _incomplete(name, key, "lora_down.weight")
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        prefix = next((p for p in _KOHYA_PREFIX if base.startswith(p)), None)
        if prefix is None:
            raise ModelFileError(f"The LoRA file '{name}' has '{key}', which names no UNet or text-encoder layer.")
        if base + ".lora_up.weight" not in sd:
            raise _incomplete(name, key, "lora_up.weight")
        if re.search(r"_(input_blocks|middle_block|output_blocks)_", base):
            raise ModelFileError(f"The LoRA file '{name}' names its layers the original (LDM) way ('{base}'), "
                                 "which Erasekit's own loader does not map; ComfyUI and A1111 load it directly.")
        down, up = sd[key], sd[base + ".lora_up.weight"]
        alpha = float(sd[base + ".alpha"]) if base + ".alpha" in sd else float(_rank(down))  # no alpha: scale 1
        lora[canonical_module(_KOHYA_PREFIX[prefix], _undot(base[len(prefix):]))] = _pair(name, base, down, up, alpha)
    return lora


def _peft_lora(sd: dict, meta: dict, name: str) -> Lora:
    suffixes = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"))  # peft, old diffusers
    a_suffix, b_suffix = next((p for p in suffixes if any(k.endswith(p[0]) for k in sd)), (None, None))
    if a_suffix is None:
        raise ModelFileError(f"The file '{name}' is not a LoRA (no lora_down/lora_A weights); pick a LoRA file.")
    orphan = next((k for k in sd if k.endswith(b_suffix) and k[: -len(b_suffix)] + a_suffix not in sd), None)
    if orphan:
        raise _incomplete(name, orphan, a_suffix.lstrip("."))
    configs = _adapter_configs(meta, name)
    lora: Lora = {}
    for base in [k[: -len(a_suffix)] for k in sd if k.endswith(a_suffix)]:
        base_ = base.removeprefix("base_model.model.")
        component, _, rest = base_.partition(".")
        if component not in COMPONENTS:  # a bare peft state dict of a UNet
            component, rest = "unet", base_
        if base + b_suffix not in sd:
            raise _incomplete(name, base + a_suffix, b_suffix.lstrip("."))
        down, up = sd[base + a_suffix], sd[base + b_suffix]
        alpha = _peft_alpha(configs, component, rest, _rank(down), sd.get(base + ".alpha"), name)
        lora[canonical_module(component, rest)] = _pair(name, base, down, up, alpha)
    return lora


def check_values(tensors: dict, name: str) -> None:
    """Refuse a LoRA file's tensors, in any LoRA format, unless each weight is floating point with
    every value finite and each ``.alpha`` is one finite positive number (a float or an integer,
    as kohya may store it)."""
    for key, t in tensors.items():
        if key.endswith(".alpha"):
            _alpha_value(name, key, t)
        elif not t.dtype.is_floating_point:
            raise ModelFileError(f"The LoRA file '{name}' stores '{key}' as {str(t.dtype).removeprefix('torch.')}, "
                                 "not floating point; the file is damaged or not a LoRA: download or export it again.")
        elif not bool(t.isfinite().all()):
            raise ModelFileError(f"The LoRA file '{name}' has NaN or infinite values in '{key}'; the file is damaged "
                                 "(or its training diverged): download or export it again.")


def _alpha_value(name: str, key: str, t) -> float:
    import torch

    if t.numel() != 1 or t.dtype.is_complex or t.dtype == torch.bool:
        raise ModelFileError(f"The LoRA file '{name}' has '{key}' of shape {list(t.shape)} and dtype "
                             f"{str(t.dtype).removeprefix('torch.')}, not one number; the file is damaged: "
                             "download or export it again.")
    return _positive_alpha(name, key, float(t))


def _positive_alpha(name: str, key: str, alpha: float) -> float:
    if not (math.isfinite(alpha) and alpha > 0):
        raise ModelFileError(f"The LoRA file '{name}' has alpha {alpha} for '{key}', but alpha must be a finite "
                             "positive number; the file is damaged: download or export it again.")
    return alpha


def _rank(down) -> int:
    return down.shape[0] if down.dim() else 0


def _pair(name: str, module: str, down, up, alpha: float) -> LoraWeights:
    """``LoraWeights(down, up, alpha)`` if the pair is what a LoRA claims to be: down [r, in] and up
    [out, r] (convolutions: [r, in, kh, kw] and [out, r, 1, 1]) of one rank r >= 1, alpha finite and
    positive; else one sentence naming the file and the module. Values: :func:`check_values`."""
    shapes = f"down {list(down.shape)}, up {list(up.shape)}"
    if down.dim() != up.dim() or down.dim() not in (2, 4) or 0 in down.shape or 0 in up.shape:
        raise ModelFileError(f"The LoRA file '{name}' has '{module}' shaped {shapes}; a LoRA pair is down [r, in] "
                             "and up [out, r] (or 4-D for a convolution): the file is damaged.")
    if down.shape[0] != up.shape[1] or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise ModelFileError(f"The LoRA file '{name}' has '{module}' shaped {shapes}, whose ranks disagree; the "
                             "file is damaged: download or export it again.")
    return LoraWeights(down, up, _positive_alpha(name, module, float(alpha)))


def _incomplete(name: str, key: str, missing: str) -> ModelFileError:
    return ModelFileError(f"The LoRA file '{name}' has '{key}' without its '{missing}': the file is incomplete; "
                          "download or export it again.")


def _adapter_configs(meta: dict, name: str) -> dict:
    """diffusers' ``lora_adapter_metadata`` (a JSON object), ``{}`` when absent."""
    try:
        configs = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except (ValueError, RecursionError):
        configs = None
    if not isinstance(configs, dict):
        raise ModelFileError(f"The LoRA file '{name}' has unreadable metadata 'lora_adapter_metadata' (not a JSON "
                             "object); download or export it again.")
    return configs


def _peft_alpha(configs: dict, component: str, path: str, rank: int, alpha_tensor, name: str) -> float:
    """kohya-style alpha (scale * r) from an ``.alpha`` tensor or diffusers' adapter metadata."""
    if alpha_tensor is not None:
        return float(alpha_tensor)
    cfg = {k.split(".", 1)[1]: v for k, v in configs.items() if "." in k and k.split(".", 1)[0] == component}
    if "lora_alpha" not in cfg:
        return float(rank)  # diffusers' default without metadata: lora_alpha = r
    from peft.utils.other import get_pattern_key

    try:
        patterns = cfg.get("alpha_pattern") or {}
        key = get_pattern_key(list(patterns), path.removeprefix("text_model."))
        alpha = float(patterns.get(key, cfg["lora_alpha"]))
    except (ValueError, TypeError, AttributeError, OverflowError):
        raise ModelFileError(f"The LoRA file '{name}' has an unreadable alpha for '{component}.{path}' in its "
                             "metadata 'lora_adapter_metadata'; download or export it again.") from None
    return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha  # rsLoRA scale alpha / sqrt(r)


def check_compatible(lora_path: str, architecture: Architecture) -> str | None:
    """Refuse a LoRA made for another base model with one sentence; return its family if known.

    Uses the metadata when present, else key names (a second text encoder means SDXL) and the
    widths of the layers that read text embeddings. Only the file header is read.
    """
    shapes, meta = checkpoints.read_header(lora_path, "LoRA file")
    name = os.path.basename(os.fspath(lora_path))
    if not any(k.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight")) for k in shapes):
        raise ModelFileError(f"The file '{name}' is not a LoRA (no lora_down/lora_A weights); pick a LoRA file.")
    fam = None  # the family, from metadata, else from key names
    if meta.get("ss_base_model_version"):
        fam = family(meta["ss_base_model_version"])
    elif meta.get("modelspec.architecture"):
        spec = meta["modelspec.architecture"].removesuffix("/lora")
        fam = next((f for p, f in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd_v2"),
                                   ("stable-diffusion-v1", "sd_v1"), ("erasekit-toy", "toy")) if spec.startswith(p)), spec)
    elif meta.get("ss_v2") == "True":
        fam = "sd_v2"
    elif any(k.startswith(("lora_te2_", "text_encoder_2.")) or "add_embedding" in k or "label_emb" in k for k in shapes):
        fam = "sdxl"
    # widths of the layers that read text: cross-attention k/v and the text encoders' q_proj, [r, width]
    # (a 1-D "down" is a damaged file: load_lora names it)
    downs = {k: s for k, s in shapes.items()
             if k.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight")) and len(s) >= 2}
    context = next((s[1] for k, s in downs.items() if re.search(r"attn2[._](processor[._])?to[._][kv]", k)), None)
    te = [next((s[1] for k, s in downs.items() if k.startswith(p) and re.search(r"q[._]proj", k)), None)
          for p in (("lora_te_", "lora_te1_", "text_encoder."), ("lora_te2_", "text_encoder_2."))]

    def refuse(what: str):
        raise ArchitectureError(f"'{name}' is a LoRA for {what}, but the model is {architecture.title}; "
                                f"pick a LoRA made for {architecture.title}.")

    # a name we do not know ("pony") leaves it to the UNet's cross-attention width; without one (a Flux or SD3
    # LoRA whose CLIP-L part matches SD1's width) the name stands
    if fam is not None and fam != family(architecture.name) and (fam in FAMILY_TITLES or context is None):
        refuse(FAMILY_TITLES.get(fam, fam))
    if context is not None and context != architecture.context_dim:
        refuse(FAMILY_TITLES.get(_WIDTH_FAMILY.get(context, ""), f"a model with {context}-wide text embeddings"))
    for width, expected in zip(te, architecture.text_widths):
        if width is not None and width != expected:
            refuse(FAMILY_TITLES.get(_WIDTH_FAMILY.get(width, ""), f"a text encoder {width} wide"))
    return fam


# ----------------------------------------------------------------------------- merge


def apply_lora(model, lora: Lora, strength: float = 1.0, component: str | None = None) -> int:
    """Merge ``lora``'s modules of ``component`` into ``model`` in place: W += strength * alpha/r * up @ down.

    ``component`` defaults to ``unet`` for a UNet and ``text_encoder`` otherwise. Returns the
    number of layers changed; a module the model lacks, or of another shape, raises ArchitectureError.
    """
    import torch

    component = component or ("unet" if hasattr(model, "conv_in") else "text_encoder")
    layers = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            flat = name.replace(".", "_")
            layers[flat] = module
            if component != "unet" and not flat.startswith("text_model"):
                layers["text_model_" + flat] = module  # transformers 5 CLIPTextModel
    n = 0
    with torch.no_grad():
        for module_name, w in lora.items():
            comp, path = module_name.split(".", 1)
            if comp != component:
                continue
            layer = layers.get(path.replace(".", "_"))
            if layer is None:
                raise ArchitectureError(f"The LoRA changes '{module_name}', which this model does not have; "
                                        "it was made for another model.")
            delta = w.delta()
            if delta.numel() != layer.weight.numel():
                raise ArchitectureError(f"The LoRA's '{module_name}' is {list(delta.shape)}, but the model's layer is "
                                        f"{list(layer.weight.shape)}; it was made for another model.")
            layer.weight += (strength * delta).reshape(layer.weight.shape).to(layer.weight)
            n += 1
    return n
