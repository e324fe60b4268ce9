"""A merged single-file checkpoint: the base model with an erasure LoRA (or a fine-tuned UNet) merged in,
written in the layout of the original Stable Diffusion releases (``model.diffusion_model.*`` UNet,
``cond_stage_model.*`` / ``conditioner.embedders.*`` text encoder(s), ``first_stage_model.*`` VAE), which
ComfyUI's CheckpointLoaderSimple and A1111/Forge read. This is what a publisher shares when the erasure
must not be a LoRA one can leave unloaded.

A single-file base keeps its file's own layout and every weight the merge does not change (its text
encoders and VAE as stored, its dtype); only the changed UNet and CLIP-L weights are replaced. A diffusers
folder base is written out whole: UNet and VAE through :mod:`erasekit.ldm_keys`, a CLIP-L text encoder
under SD1's ``cond_stage_model.transformer.`` (an OpenCLIP encoder, SD2's or SDXL's second, has no such
map here: pass that base as its single-file checkpoint).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass

from . import checkpoints
from .errors import ArchitectureError, ErasekitError
from .ldm_keys import LDM_UNET, unet_ldm_names, vae_to_ldm

# where the CLIP-L text encoder lives in an original single file, by the first key that tells
_CLIP_L_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")


@dataclass
class Merged:
    path: str
    architecture: object
    unet_changed: int  # UNet weights that differ from the base
    text_changed: int  # text-encoder weights that differ from the base
    method: str
    concept: str


def merge_checkpoint(base: str, out: str, lora: str | None = None, unet: str | None = None, strength: float = 1.0,
                     method: str = "", concept: str = "", settings: dict | None = None,
                     model_config: str | None = None, progress=None) -> Merged:
    """Write ``out``: ``base`` with ``lora`` merged at ``strength`` (or the fine-tuned UNet weights file ``unet``,
    full or partial, diffusers- or LDM-keyed) as one original-layout ``.safetensors`` checkpoint, atomically.

    ``method`` and ``concept`` default to the LoRA's own metadata; they, ``settings`` and the source files'
    names go into the checkpoint's metadata (``erasekit.*``, modelspec). ``progress(message)`` is told each stage.
    """
    import torch

    from . import convert, lora_io, models

    say = progress or (lambda message: None)
    if (lora is None) == (unet is None):
        raise ValueError("give either a LoRA or a fine-tuned UNet to merge")
    out = os.fspath(out)
    if not out.endswith(".safetensors"):
        raise ErasekitError(f"The merged checkpoint '{out}' must be a .safetensors file (A1111 and ComfyUI read it; "
                            "a pickle could carry code).")
    if lora is not None:
        checkpoints.read_header(lora, "LoRA file")  # a missing or damaged file: refused before the model loads
    base_name = os.path.basename(os.path.normpath(base))
    say(f"loading the base model {base_name}")
    comps = models.load(base, config=model_config)
    arch = comps.architecture
    source = os.path.basename(os.path.normpath(lora or unet))
    te_changed = [set() for _ in comps.text_encoders]  # state-dict keys the merge changes (no copy of the model kept)
    if lora is not None:
        lora_io.check_compatible(lora, arch)  # another base model's LoRA: one sentence, before any merge
        weights, meta = lora_io.load_lora(lora)
        method, concept = method or meta.get("erasekit.method", ""), concept or meta.get("erasekit.erased_concept", "")
        say(f"merging {source} at strength {strength}")
        lora_io.apply_lora(comps.unet, weights, strength, component="unet")
        unet_changed = {m.split(".", 1)[1] + ".weight" for m in weights if m.startswith("unet.")}
        for changed, component, te in zip(te_changed, lora_io.COMPONENTS[1:], comps.text_encoders):
            lora_io.apply_lora(te, weights, strength, component=component)
            keys = te.state_dict().keys()
            for m in (m for m in weights if m.startswith(component + ".")):
                key = m.split(".", 1)[1] + ".weight"
                changed.add(key if key in keys else key.removeprefix("text_model."))  # transformers 5: no text_model.
    else:
        tensors, meta = convert.read_weights(unet)
        method, concept = method or meta.get("erasekit.method", ""), concept or meta.get("erasekit.erased_concept", "")
        tuned, _ = convert.unet_weights(tensors, comps.unet, source)
        say(f"putting in {len(tuned)} UNet weights from {source}")
        sd, unet_changed = comps.unet.state_dict(), set()
        for key, t in tuned.items():
            t = t.to(sd[key].dtype)
            if not torch.equal(sd[key], t):
                sd[key].copy_(t)
                unet_changed.add(key)
    unet_sd = comps.unet.state_dict()
    names = unet_ldm_names(unet_sd, dict(comps.unet.config))
    say("writing the checkpoint")
    if os.path.isfile(base):
        tensors, base_meta = _into_single_file(base, base_name, comps, unet_sd, unet_changed, names, te_changed)
    else:
        tensors, base_meta = _from_folder(comps, unet_sd, names, base_name), {}
    meta = {**base_meta, **_metadata(arch, base_name, source, method, concept, strength, settings, bool(lora))}
    checkpoints.save_file_atomic(tensors, out, meta)
    return Merged(out, arch, len(unet_changed), sum(len(c) for c in te_changed), method, concept)


def _into_single_file(base, base_name, comps, unet_sd, unet_changed, names, te_changed):
    tensors, meta = checkpoints.load_file(base, "base checkpoint")
    for key in sorted(unet_changed):
        ldm = LDM_UNET + names[key]
        if ldm not in tensors or list(tensors[ldm].shape) != list(unet_sd[key].shape):
            raise ArchitectureError(f"The base checkpoint '{base_name}' has no weight '{ldm}' shaped like the UNet's "
                                    f"'{key}'; its layout is not the original release's, so the merge cannot be written "
                                    "into it: pass the model as a diffusers folder.")
        tensors[ldm] = unet_sd[key].detach().to(tensors[ldm].dtype).clone()
    if any(te_changed[1:]):
        raise ArchitectureError("The LoRA changes the second (OpenCLIP) text encoder, whose fused layout Erasekit does "
                                "not write; merge a LoRA without text-encoder layers for it (train without "
                                "--train-text-encoder).")
    if te_changed and te_changed[0]:
        prefix = next((p for p in _CLIP_L_PREFIXES if any(k.startswith(p) for k in tensors)), None)
        if prefix is None:
            raise ArchitectureError(f"The LoRA changes the text encoder, but '{base_name}' has no CLIP-L text encoder in "
                                    "the original layout (an SD2 OpenCLIP encoder is fused differently); merge a LoRA "
                                    "without text-encoder layers for it.")
        te_sd = comps.text_encoders[0].state_dict()
        for key in te_changed[0]:
            ldm = prefix + ("" if key.startswith("text_model.") else "text_model.") + key
            if ldm not in tensors:
                raise ArchitectureError(f"The base checkpoint '{base_name}' has no text-encoder weight '{ldm}'; its "
                                        "layout is not the original release's: pass the model as a diffusers folder.")
            tensors[ldm] = te_sd[key].detach().to(tensors[ldm].dtype).clone()
    return tensors, meta


def _from_folder(comps, unet_sd, names, base_name) -> dict:
    fam = comps.architecture.name
    if len(comps.text_encoders) != 1 or fam.startswith("sd_v2"):
        raise ArchitectureError(f"'{base_name}' is {comps.architecture.title} as a diffusers folder; its OpenCLIP text "
                                "encoder has no original-layout writer here: pass the same model as its single-file "
                                ".safetensors checkpoint as --base.")
    tensors = {LDM_UNET + names[k]: v.detach().clone() for k, v in unet_sd.items()}
    te = comps.text_encoders[0].state_dict()
    tensors |= {"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k:
                v.detach().clone() for k, v in te.items()}
    vae = comps.vae
    if vae is not None and type(vae).__name__ == "AutoencoderKL":
        tensors |= {k: v.detach().clone() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()}
    elif vae is not None:  # the toy model's pixel-space "VAE": whatever it holds, under the VAE's prefix
        tensors |= {"first_stage_model." + k: v.detach().clone() for k, v in vae.state_dict().items()}
    return tensors


def _metadata(arch, base_name, source, method, concept, strength, settings, from_lora) -> dict:
    from .lora_io import IMPLEMENTATION

    what = f"Erases '{concept}'" if concept else "Fine-tuned"
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": arch.modelspec,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": f"{base_name} without {concept}" if concept else base_name,
        "modelspec.description": f"{what} ({method or 'method not given'}): {base_name} with '{source}' merged in.",
        "modelspec.date": datetime.datetime.now().isoformat(timespec="seconds"),
        "erasekit.method": method,
        "erasekit.erased_concept": concept,
        "erasekit.base_model": base_name,
        "erasekit.merged": source,
        "erasekit.config": json.dumps({"merge": {"source": source, "kind": "lora" if from_lora else "unet",
                                                 "strength": strength}, "settings": settings or {}},
                                      sort_keys=True, default=str),
    }
