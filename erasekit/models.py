"""Load a text-to-image model's parts: UNet, text encoder(s), tokenizer(s), VAE, scheduler.

Three sources, one result (:class:`Components`):
  (a) a diffusers folder (``model_index.json`` + subfolders), e.g. ``models/toy``;
  (b) a single-file SD1.x / SD2.x / SDXL checkpoint (``.safetensors``), read by diffusers'
      ``from_single_file`` with a *local* config folder, so nothing is downloaded;
  (c) modules already in memory (:func:`from_modules`).
The architecture is detected from the file itself (:mod:`erasekit.checkpoints`), so a wrong
or unknown file fails with one sentence naming it before any weight is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from . import checkpoints
from .checkpoints import Architecture
from .errors import ArchitectureError, ModelFileError


@dataclass
class Components:
    """The parts of a Stable-Diffusion-style model, as diffusers / transformers modules."""

    unet: object
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    vae: object = None
    scheduler: object = None
    architecture: Architecture | None = None
    source: str = "memory"

    @property
    def text_encoder(self):
        return self.text_encoders[0] if self.text_encoders else None

    @property
    def tokenizer(self):
        return self.tokenizers[0] if self.tokenizers else None


def architecture_of_unet(unet, text_encoders=()) -> Architecture:
    """Architecture of a diffusers UNet in memory (the toy model is recognised by its config)."""
    cfg = unet.config
    if getattr(cfg, "in_channels", 4) == 12 and getattr(cfg, "sample_size", 0) == 16:
        return checkpoints.toy(cfg.cross_attention_dim)
    shapes = {k: list(v.shape) for k, v in unet.state_dict().items()}
    arch = checkpoints.detect_architecture(shapes, "the UNet in memory")
    if arch.name == "sdxl_base_v1-0" and len(text_encoders) == 2:
        widths = tuple(te.config.hidden_size for te in text_encoders)
        arch = checkpoints.sdxl(widths)
    return arch


def from_modules(unet, text_encoder=None, tokenizer=None, vae=None, scheduler=None,
                 text_encoder_2=None, tokenizer_2=None) -> Components:
    """Wrap modules already in memory (e.g. taken from a running pipeline)."""
    tes = [m for m in (text_encoder, text_encoder_2) if m is not None]
    toks = [t for t in (tokenizer, tokenizer_2) if t is not None]
    return Components(unet, tes, toks, vae, scheduler, architecture_of_unet(unet, tes), "memory")


def load(source: str, config: str | None = None, torch_dtype=None) -> Components:
    """Load a model from a diffusers folder or a single-file ``.safetensors`` checkpoint.

    Args:
        source: path of a diffusers folder or of a single-file checkpoint.
        config: for single files, a local diffusers folder with the matching configs and
            tokenizer(s) (weights not needed). Defaults to ``models/configs/<architecture>``
            of this repository.
        torch_dtype: dtype to load the weights in (default: as stored).
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        return _load_folder(source, torch_dtype)
    return _load_single_file(source, config, torch_dtype)


def _load_folder(path: str, torch_dtype) -> Components:
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ModelFileError(
            f"The folder '{path}' is not a diffusers model (no model_index.json); pick a diffusers folder "
            "or a single .safetensors checkpoint."
        )
    pipeline_class = _pipeline_class(index)
    checkpoints.check_safetensors_folder(path, "diffusers folder")
    if pipeline_class == "ToyPipeline":  # the toy model's own components are not in diffusers
        from .toyworld.model import load_toy_pipeline

        pipe = load_toy_pipeline(path, torch_dtype=torch_dtype) if torch_dtype else load_toy_pipeline(path)
    else:
        from diffusers import DiffusionPipeline

        try:  # use_safetensors: a part whose weights are only a pickle (.bin) is refused, never unpickled
            pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=torch_dtype,
                                                     use_safetensors=True)
        except (OSError, ValueError) as err:
            reason = str(err).splitlines()[0][:200].rstrip('.')
            raise ModelFileError(f"The diffusers folder '{path}' could not be loaded ({reason}); "
                                 "check that every part has its .safetensors weights and config.") from None
    return _from_pipeline(pipe, path)


def _pipeline_class(index: str) -> str | None:
    """``_class_name`` of a ``model_index.json``; a damaged one is named in one sentence."""
    try:
        with open(index, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as err:
        raise ModelFileError(f"'{index}' could not be read ({str(err).splitlines()[0][:120]}); the model folder "
                             "is damaged: download or export it again.") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"'{index}' is not a JSON object; the model folder is damaged: download or export it again.")
    return config.get("_class_name")


def _from_pipeline(pipe, source: str) -> Components:
    parts = pipe.components
    tes = [parts[k] for k in ("text_encoder", "text_encoder_2") if parts.get(k) is not None]
    toks = [parts[k] for k in ("tokenizer", "tokenizer_2") if parts.get(k) is not None]
    return Components(parts["unet"], tes, toks, parts.get("vae"), parts.get("scheduler"),
                      architecture_of_unet(parts["unet"], tes), source)


def default_config_dir(arch: Architecture) -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "models", "configs", arch.name)


def _load_single_file(path: str, config: str | None, torch_dtype) -> Components:
    """A single-file checkpoint through diffusers' ``from_single_file``, which needs the model's
    configs and tokenizer(s) (no weights): from ``config``, else ``models/configs/<architecture>``,
    else diffusers fetches them from the Hugging Face Hub as it does for any single file."""
    shapes, _ = checkpoints.read_header(path, "checkpoint")
    arch = checkpoints.detect_architecture(shapes, path)
    local = default_config_dir(arch)
    if config is not None and not os.path.isfile(os.path.join(config, "model_index.json")):
        raise ModelFileError(
            f"'{path}' is a {arch.title} checkpoint, but the config folder '{config}' it needs (diffusers "
            "configs and tokenizer, no weights) is missing; pass config=<a diffusers folder of the same model>."
        )
    config = config or (local if os.path.isfile(os.path.join(local, "model_index.json")) else None)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if arch.name.startswith("sdxl") else StableDiffusionPipeline
    kwargs = {} if cls is StableDiffusionXLPipeline else {"safety_checker": None}
    try:
        pipe = cls.from_single_file(path, config=config, local_files_only=config is not None, torch_dtype=torch_dtype,
                                    **kwargs)
    except OSError as err:  # no local configs and the Hub not reachable (offline, or HF_HUB_OFFLINE=1)
        raise ModelFileError(
            f"'{path}' is a {arch.title} checkpoint; loading it needs that model's diffusers configs and tokenizer "
            f"(no weights), which diffusers fetches from the Hugging Face Hub, and the Hub is not reachable "
            f"({str(err).splitlines()[0][:120]}). Pass a local diffusers folder of the same model (its weights are "
            f"not needed) with --model-config, or put one at '{local}'."
        ) from None
    except (ValueError, RuntimeError, KeyError) as err:
        raise ArchitectureError(
            f"'{path}' looks like {arch.title} but does not fit the config in '{config or 'the Hub'}' "
            f"({str(err).splitlines()[0]})."
        ) from None
    comps = _from_pipeline(pipe, path)
    comps.architecture = arch
    return comps
