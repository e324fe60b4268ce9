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

    @property
    def is_toy(self) -> bool:
        """The toy world's model (its judge, rendered scenes and concept prompts apply)."""
        return self.architecture is not None and self.architecture.name == "toy"


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
            tokenizer(s) (weights not needed). Defaults to the folder this repository ships in
            ``models/configs`` for the file's architecture (:func:`config_variant`); nothing is
            fetched from the Hub.
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
            pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, local_files_only=True,
                                                     torch_dtype=torch_dtype)
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


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "configs")
"""The configs (no weights) single files load with by default, one folder per architecture (README.md there)."""
CLIP_BPE_DIR = os.path.join(CONFIGS_DIR, "clip_bpe")
"""CLIP's BPE vocabulary (vocab.json, merges.txt), kept once for every shipped tokenizer folder."""
SD_V2_BASE = "sd_v2_base"
SD_V2_BASE_GLOBAL_STEP = 875000  # diffusers' rule: the SD2 512 base checkpoint's training step; anything else is 768-v
_COMPONENT_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                    "text_encoder_2": "config.json", "scheduler": "scheduler_config.json"}


def default_config_dir(arch: Architecture, variant: str | None = None) -> str:
    """The shipped config folder of an architecture (``variant``: a folder name such as ``sd_v2_base``)."""
    return os.path.join(CONFIGS_DIR, variant or arch.name)


def config_variant(arch: Architecture, path: str, shapes: dict, metadata: dict) -> str:
    """Which shipped config folder a single file loads with: its architecture's, except that an SD2
    file is 768-v (``sd_v2``, v-prediction) unless it says it is the 512 base (``sd_v2_base``,
    epsilon). The rule is diffusers' own (a ``global_step`` of 875000, the SD2 base release's),
    preceded by what the file declares in its ``modelspec.architecture`` metadata."""
    if arch.name != "sd_v2":
        return arch.name
    spec = str(metadata.get("modelspec.architecture", ""))
    if spec.startswith("stable-diffusion-v2-512"):
        return SD_V2_BASE
    if spec.startswith("stable-diffusion-v2-768"):
        return "sd_v2"
    return SD_V2_BASE if _global_step(path, shapes) == SD_V2_BASE_GLOBAL_STEP else "sd_v2"


def _global_step(path: str, shapes: dict) -> int | None:
    """The scalar ``global_step`` entry of a checkpoint, if it has one (one number is read)."""
    if "global_step" not in shapes or any(d != 1 for d in shapes["global_step"]):
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return int(f.get_tensor("global_step").reshape(-1)[0].item())
    except Exception:  # an odd dtype or a damaged entry: no step, the default variant
        return None


def _is_shipped(folder: str) -> bool:
    root = os.path.realpath(CONFIGS_DIR)
    try:
        return os.path.commonpath([root, os.path.realpath(folder)]) == root
    except ValueError:  # another drive (Windows)
        return False


def missing_config_file(config: str) -> str | None:
    """The first file a single-file load needs from the config folder ``config`` that is not there
    (``model_index.json``, each part's config, the tokenizers' files; a shipped folder's tokenizers
    take their vocabulary from :data:`CLIP_BPE_DIR`), or None."""
    index_path = os.path.join(config, "model_index.json")
    if not os.path.isfile(index_path):
        return index_path
    index = _read_index(index_path)
    shipped = _is_shipped(config)
    for name in sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[:1] != [None]):
        part = os.path.join(config, name)
        if name in _COMPONENT_FILES:
            needed = [os.path.join(part, _COMPONENT_FILES[name])]
        elif name.startswith("tokenizer"):
            if shipped:
                needed = [os.path.join(part, "tokenizer_config.json"), os.path.join(part, "special_tokens_map.json"),
                          os.path.join(CLIP_BPE_DIR, "vocab.json"), os.path.join(CLIP_BPE_DIR, "merges.txt")]
            elif os.path.isfile(os.path.join(part, "tokenizer.json")):
                needed = []
            else:
                needed = [os.path.join(part, "vocab.json"), os.path.join(part, "merges.txt")]
        else:
            continue  # parts the loaders do not use (safety checker, feature extractor)
        missing = next((f for f in needed if not os.path.isfile(f)), None)
        if missing:
            return missing
    return None


def shipped_tokenizers(config: str) -> dict:
    """``{"tokenizer": ..., "tokenizer_2": ...}`` of a shipped config folder, built from each
    tokenizer folder's settings and the one shared copy of CLIP's vocabulary; ``{}`` for any other
    folder (diffusers reads its tokenizers itself)."""
    if not _is_shipped(config):
        return {}
    import shutil
    import tempfile

    from transformers import CLIPTokenizer

    index = _read_index(os.path.join(config, "model_index.json"))
    out = {}
    for name in ("tokenizer", "tokenizer_2"):
        part = os.path.join(config, name)
        if index.get(name, [None])[:1] == [None] or os.path.isfile(os.path.join(part, "vocab.json")):
            continue
        with tempfile.TemporaryDirectory(prefix="erasekit-tokenizer-") as tmp:  # the folder layout any version reads
            for f in ("tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy(os.path.join(part, f), tmp)
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(CLIP_BPE_DIR, f), tmp)
            out[name] = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
    return out


def _read_index(index: str) -> dict:
    _pipeline_class(index)  # a damaged model_index.json is named in one sentence
    with open(index, encoding="utf-8") as f:
        return json.load(f)


def _load_single_file(path: str, config: str | None, torch_dtype) -> Components:
    """A single-file checkpoint through diffusers' ``from_single_file``, which needs the model's
    configs and tokenizer(s) (no weights): from ``config``, else the folder shipped in
    ``models/configs`` (:func:`config_variant`). Always offline: nothing is fetched from the Hub."""
    shapes, metadata = checkpoints.read_header(path, "checkpoint")
    arch = checkpoints.detect_architecture(shapes, path)
    if config is not None and not os.path.isfile(os.path.join(config, "model_index.json")):
        raise ModelFileError(
            f"'{path}' is a {arch.title} checkpoint, but the config folder '{config}' it needs (diffusers "
            "configs and tokenizer, no weights) is missing; pass config=<a diffusers folder of the same model>."
        )
    config = config or default_config_dir(arch, config_variant(arch, path, shapes, metadata))
    missing = missing_config_file(config)
    if missing is not None:
        fix = "restore models/configs from Erasekit's repository, or pass" if _is_shipped(config) else "pass"
        raise ModelFileError(f"'{path}' is a {arch.title} checkpoint, but the config file '{missing}' it needs is "
                             f"missing; {fix} a complete diffusers folder of the same model (configs and tokenizer, "
                             "no weights) with --model-config.")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    cls = StableDiffusionXLPipeline if arch.name.startswith("sdxl") else StableDiffusionPipeline
    kwargs = {} if cls is StableDiffusionXLPipeline else {"safety_checker": None}
    try:
        kwargs |= shipped_tokenizers(config)
        pipe = cls.from_single_file(path, config=config, local_files_only=True, torch_dtype=torch_dtype, **kwargs)
    except OSError as err:  # a config file unreadable, or one a part needs that the check above does not know
        raise ModelFileError(
            f"'{path}' is a {arch.title} checkpoint, but its config folder '{config}' could not be read "
            f"({str(err).splitlines()[0][:160].rstrip('.')}); pass a complete diffusers folder of the same model "
            "(configs and tokenizer, no weights) with --model-config."
        ) from None
    except (ValueError, RuntimeError, KeyError, SingleFileComponentError) as err:
        raise ArchitectureError(
            f"'{path}' looks like {arch.title} but does not fit the config in '{config}' "
            f"({str(err).splitlines()[0][:200].rstrip('.')}); pass a diffusers folder of that model (configs and "
            "tokenizer, no weights) with --model-config."
        ) from None
    comps = _from_pipeline(pipe, path)
    comps.architecture = arch
    return comps
