"""A merged single-file checkpoint: the base model with an erasure LoRA (or a fine-tuned UNet) merged in,
written in the layout of the original Stable Diffusion releases (``model.diffusion_model.*`` UNet,
``cond_stage_model.*`` / ``conditioner.embedders.*`` text encoder(s), ``first_stage_model.*`` VAE), which
ComfyUI's CheckpointLoaderSimple and A1111/Forge read. This is what a publisher shares when the erasure
must not be a LoRA one can leave unloaded.

A single-file base keeps its file's own layout and every weight the merge does not change (its text
encoders and VAE as stored, its dtype); only the changed UNet and CLIP-L weights are replaced, in the file's
own tensors (no pipeline is built: the file is held in memory once). A diffusers
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
    ``model_config``: for a single-file base, the diffusers config folder it loads with (as ``--model-config``).
    """
    from . import convert, lora_io

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
    source = os.path.basename(os.path.normpath(lora or unet))
    say(f"reading the base model {base_name}")
    model = _FileModel(base, model_config) if os.path.isfile(base) else _FolderModel(base)
    if lora is not None:
        lora_io.check_compatible(lora, model.architecture)  # another base model's LoRA: one sentence, before any merge
        weights, meta = lora_io.load_lora(lora)
        say(f"merging {source} at strength {strength}")
        model.merge_lora(weights, strength)
    else:
        tensors, meta = convert.read_weights(unet)
        tuned, _ = convert.unet_weights(tensors, model.unet_skeleton(), source)
        say(f"putting in {len(tuned)} UNet weights from {source}")
        for key, t in tuned.items():
            model.put(key, t)
    method, concept = method or meta.get("erasekit.method", ""), concept or meta.get("erasekit.erased_concept", "")
    say("writing the checkpoint")
    tensors, base_meta = model.ldm_state_dict()
    meta = {**base_meta, **_metadata(model.architecture, base_name, source, method, concept, strength, settings,
                                     lora is not None)}
    checkpoints.save_file_atomic(tensors, out, meta)
    return Merged(out, model.architecture, len(model.unet_changed), len(model.text_changed), method, concept)


class _FileModel:
    """A single-file base, changed in place in its own tensors: its layout, dtype and every other weight stay as
    stored, and no diffusers pipeline is built (a real SDXL file is held once in memory, not twice). Which UNet
    weight is which comes from its diffusers config (``model_config``, else the shipped one), checked against the
    file's shapes on an empty (meta-device) UNet of that config."""

    def __init__(self, path: str, model_config: str | None):
        from . import models

        self.name = os.path.basename(path)
        shapes, meta = checkpoints.read_header(path, "base checkpoint")
        self.architecture = checkpoints.detect_architecture(shapes, path)
        config = model_config or models.default_config_dir(
            self.architecture, models.config_variant(self.architecture, path, shapes, meta))
        self.config = _unet_config(config, self.name)
        self.names = unet_ldm_names(self.unet_skeleton().state_dict(), self.config)
        for key, shape in self._skeleton_shapes.items():
            ldm = LDM_UNET + self.names[key]
            if shapes.get(ldm) != shape:
                raise ArchitectureError(
                    f"'{self.name}' does not fit the UNet config in '{config}': its '{ldm}' is {shapes.get(ldm, 'missing')}, "
                    f"the config's {shape}; pass a diffusers folder of this model (configs, no weights) with --model-config.")
        self.tensors, self.meta = checkpoints.load_file(path, "base checkpoint")
        self.clip_prefix = next((p for p in _CLIP_L_PREFIXES if any(k.startswith(p) for k in shapes)), None)
        self.unet_changed, self.text_changed = set(), set()

    def unet_skeleton(self):
        """The base's UNet on the meta device: names, shapes and config, no memory."""
        if not hasattr(self, "_skeleton"):
            from accelerate import init_empty_weights
            from diffusers import UNet2DConditionModel

            with init_empty_weights():
                self._skeleton = UNet2DConditionModel.from_config(self.config)
            self._skeleton_shapes = {k: list(v.shape) for k, v in self._skeleton.state_dict().items()}
        return self._skeleton

    def _key(self, module: str) -> str:
        component, path = module.split(".", 1)
        if component == "unet":
            if path + ".weight" not in self.names:
                raise ArchitectureError(f"The LoRA changes '{module}', which this model does not have; it was made for "
                                        "another model.")
            return LDM_UNET + self.names[path + ".weight"]
        if component == "text_encoder" and self.clip_prefix is not None:
            return self.clip_prefix + ("" if path.startswith("text_model.") else "text_model.") + path + ".weight"
        raise ArchitectureError(f"The LoRA changes '{module}', a layer of an OpenCLIP text encoder (SD2's, or SDXL's "
                                "second), whose fused layout Erasekit does not write; merge a LoRA without those "
                                "text-encoder layers (train without --train-text-encoder).")

    def merge_lora(self, lora: dict, strength: float) -> None:
        for module, w in lora.items():
            key, delta = self._key(module), strength * w.delta()
            t = self.tensors.get(key)
            if t is None or t.numel() != delta.numel():
                raise ArchitectureError(f"The LoRA's '{module}' is {list(delta.shape)}, but '{self.name}' has "
                                        f"{list(t.shape) if t is not None else 'no such weight'}; it was made for another "
                                        "model.")
            self.tensors[key] = (t.float() + delta.reshape(t.shape)).to(t.dtype)  # one rounding, in the file's dtype
            (self.unet_changed if module.startswith("unet.") else self.text_changed).add(key)

    def put(self, key: str, value) -> None:
        ldm = LDM_UNET + self.names[key]
        value = value.to(self.tensors[ldm].dtype)
        if not bool((value == self.tensors[ldm]).all()):
            self.tensors[ldm] = value.contiguous()
            self.unet_changed.add(ldm)

    def ldm_state_dict(self):
        return self.tensors, self.meta


class _FolderModel:
    """A diffusers-folder base, loaded whole and written out whole in the original layout."""

    def __init__(self, path: str):
        from . import models

        self.name = os.path.basename(os.path.normpath(path))
        self.comps = models.load(path)
        self.architecture = self.comps.architecture
        self.unet_changed, self.text_changed = set(), set()

    def unet_skeleton(self):
        return self.comps.unet

    def merge_lora(self, lora: dict, strength: float) -> None:
        from . import lora_io

        lora_io.apply_lora(self.comps.unet, lora, strength, component="unet")
        for component, te in zip(lora_io.COMPONENTS[1:], self.comps.text_encoders):
            lora_io.apply_lora(te, lora, strength, component=component)
        encoders = lora_io.COMPONENTS[1:1 + len(self.comps.text_encoders)]
        stray = next((m for m in lora if m.split(".", 1)[0] not in ("unet", *encoders)), None)
        if stray is not None:
            raise ArchitectureError(f"The LoRA changes '{stray}', which this model does not have; it was made for "
                                    "another model.")
        self.unet_changed = {m for m in lora if m.startswith("unet.")}
        self.text_changed = set(lora) - self.unet_changed

    def put(self, key: str, value) -> None:
        sd = self.comps.unet.state_dict()
        value = value.to(sd[key].dtype)
        if not bool((value == sd[key]).all()):
            sd[key].copy_(value)
            self.unet_changed.add(key)

    def ldm_state_dict(self):
        unet_sd = self.comps.unet.state_dict()
        names = unet_ldm_names(unet_sd, dict(self.comps.unet.config))
        return _from_folder(self.comps, unet_sd, names, self.name), {}


def _unet_config(folder: str, name: str) -> dict:
    path = os.path.join(folder, "unet", "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ErasekitError(f"The UNet config '{path}' that '{name}' needs could not be read ({err}); pass a diffusers "
                            "folder of this model (configs, no weights) with --model-config.") from None
    return {k: v for k, v in config.items() if not k.startswith("_")}


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
