"""Other people's erased weights as an erasure LoRA: a full or partial fine-tuned UNet (an official NCD or
ResAlign release, an ESD or UCE file), diffusers- or LDM-keyed, becomes a kohya LoRA by truncated SVD of
its difference to the base model (:mod:`erasekit.lora_extract`), with the extraction error reported and
written into the file's metadata beside the method and the erased concept.

Files are read as ``.safetensors`` (header checked first); a ``.pt`` / ``.bin`` / ``.pth`` / ``.ckpt``
only through ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers,
and then only a dict of tensors (or a ``{"state_dict": {...}}`` checkpoint) is taken.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import dataclass, field

from . import checkpoints
from .errors import ArchitectureError, ModelFileError
from .ldm_keys import LDM_UNET, unet_ldm_names

_LDM_BLOCKS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.", "label_emb.")
_DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"


@dataclass
class Conversion:
    """What :func:`convert_to_lora` wrote and how well the LoRA holds the fine-tune."""

    path: str
    rank: int
    layers: int  # modules in the LoRA
    max_error: float  # relative Frobenius error ||dW - up@down|| / ||dW||, worst layer
    mean_error: float
    median_error: float
    worst: list = field(default_factory=list)  # [(module, error)], worst first, at most 5
    not_in_lora: dict = field(default_factory=dict)  # changed weights a LoRA cannot hold: {key: relative change}
    ignored: int = 0  # weights of the file that are not the UNet's (text encoder, VAE), left out

    def summary(self) -> str:
        """A few lines for a person: the error summary, the worst layers, what the LoRA leaves out."""
        lines = [f"LoRA: {self.path}", f"{self.layers} layers at rank {self.rank}; relative error per layer "
                 f"||dW - LoRA|| / ||dW||: max {self.max_error:.4f}, mean {self.mean_error:.4f}, "
                 f"median {self.median_error:.4f}"]
        lines += [f"  worst: {m} {e:.4f}" for m, e in self.worst]
        if self.not_in_lora:
            top = sorted(self.not_in_lora.items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"{len(self.not_in_lora)} changed weights a LoRA cannot hold (biases, norms) are left out, "
                         "largest relative change: " + ", ".join(f"{k} {v:.2e}" for k, v in top))
        if self.ignored:
            lines.append(f"{self.ignored} weights of the file that are not the UNet's (text encoder, VAE) were left "
                         "out: the LoRA holds the UNet's change.")
        if self.max_error > 0.1:
            lines.append("The error is large: raise --rank (or check that --base is the model this was fine-tuned from).")
        return "\n".join(lines)


def read_weights(path: str) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a weights file: ``.safetensors``, a diffusers UNet folder, or a pickle of plain
    tensors (``torch.load(weights_only=True)``). Anything else is refused with one sentence."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inner = next((os.path.join(path, *p) for p in ((_DIFFUSERS_FILE,), ("unet", _DIFFUSERS_FILE))
                      if os.path.isfile(os.path.join(path, *p))), None)
        if inner is None:
            raise ModelFileError(f"The folder '{path}' holds no UNet weights ({_DIFFUSERS_FILE} in it or in unet/); "
                                 "pick the fine-tuned .safetensors file or the model's folder.")
        path = inner
    if not path.lower().endswith(checkpoints.PICKLE_SUFFIXES):
        return checkpoints.load_file(path, "fine-tuned weights file")
    return _plain_tensor_pickle(path), {}


def _plain_tensor_pickle(path: str) -> dict:
    import pickle

    import torch

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"The fine-tuned weights file '{path}' does not exist; check the path.")
    try:
        # weights_only: the unpickler builds tensors and plain containers only, never runs a file's code
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:  # a damaged or non-tensor pickle (an opcode the safe unpickler does not take)
            raise ModelFileError(f"'{name}' could not be read as a PyTorch weights file of plain tensors "
                                 f"({_last_line(err)}); it is damaged or not a weights file.") from None
        raise ModelFileError(f"'{name}' is a pickle that holds more than plain tensors (the object '{found.group(1)}'), "
                             "which could run code when loaded, so Erasekit does not open it; convert it to .safetensors "
                             "with the tool that made it, or save only its state_dict.") from None
    except Exception as err:  # torch.load's errors for a truncated zip or not a pickle at all
        raise ModelFileError(f"'{name}' could not be read as a PyTorch weights file ({_last_line(err)}); it is probably "
                             "corrupt: download it again.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # an LDM / Lightning checkpoint: the weights, the rest is training state
    if not isinstance(obj, dict) or not obj:
        raise ModelFileError(f"'{name}' holds a {type(obj).__name__}, not a dict of named tensors; save the fine-tuned "
                             "UNet's state_dict (or a .safetensors file) and convert that.")
    bad = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ModelFileError(f"'{name}' has '{bad}' = a {type(obj[bad]).__name__}, not a tensor; save only the "
                             "fine-tuned UNet's state_dict (or a .safetensors file) and convert that.")
    return obj


def _last_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("Check the doc")]
    return (lines[-1] if lines else type(err).__name__)[:160].rstrip(".")


def unet_weights(tensors: dict, base_unet, name: str) -> tuple[dict, int]:
    """The file's UNet weights under the base UNet's diffusers names: ``(weights, ignored)`` where ``ignored``
    counts the file's weights of other parts (a full checkpoint's text encoder and VAE).

    Diffusers keys (``down_blocks...``, optionally under ``unet.``) are taken as they are; LDM keys
    (``model.diffusion_model.*``, ``diffusion_model.*`` or bare ``input_blocks...``) are renamed with the
    inverse of diffusers' converter (:func:`erasekit.ldm_keys.unet_ldm_names`). A weight the base has no
    place for, or of another shape, means another base model: refused with one sentence.
    """
    if any(k.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight")) for k in tensors):
        raise ModelFileError(f"'{name}' is already a LoRA; load it directly (Load Erasure LoRA, <lora:...>) instead "
                             "of converting it.")
    base = base_unet.state_dict()
    ldm_prefix = next((p for p in (LDM_UNET, "diffusion_model.") if any(k.startswith(p) for k in tensors)), None)
    if ldm_prefix is None and any(k.startswith(_LDM_BLOCKS) for k in tensors):
        ldm_prefix = ""
    out, ignored = {}, 0
    if ldm_prefix is not None:
        to_diffusers = {ldm: key for key, ldm in unet_ldm_names(base, dict(base_unet.config)).items()}
        for key, t in tensors.items():
            if not key.startswith(ldm_prefix) or (not ldm_prefix and not key.startswith(_LDM_BLOCKS)):
                ignored += 1
                continue
            ldm = key[len(ldm_prefix):]
            if ldm not in to_diffusers:
                raise ArchitectureError(f"'{name}' has the UNet weight '{key}', which the base model's UNet does not "
                                        "have; it was fine-tuned from another model: pass that model with --base.")
            out[to_diffusers[ldm]] = t
    else:
        for key, t in tensors.items():
            key = key.removeprefix("unet.")
            if key not in base:
                if key.startswith(("text_encoder", "vae.", "text_model.", "cond_stage_model.", "first_stage_model.")):
                    ignored += 1
                    continue
                raise ArchitectureError(f"'{name}' has the weight '{key}', which the base model's UNet does not have; "
                                        "it is not a UNet fine-tuned from this model: pass that model with --base.")
            out[key] = t
    if not out:
        raise ModelFileError(f"'{name}' holds no UNet weights; pick the fine-tuned UNet's file (diffusers or "
                             "'model.diffusion_model.*' keys).")
    for key, t in out.items():
        if list(t.shape) != list(base[key].shape):
            raise ArchitectureError(f"'{name}' was fine-tuned from another model: its '{key}' is {list(t.shape)}, the "
                                    f"base model's {list(base[key].shape)}; pass the model it was fine-tuned from with --base.")
        if not t.dtype.is_floating_point:
            raise ModelFileError(f"'{name}' stores '{key}' as {str(t.dtype).removeprefix('torch.')}, not floating point; "
                                 "the file is damaged or not a UNet.")
    return out, ignored


def convert_to_lora(source: str, base: str, out: str, rank: int = 8, method: str = "", concept: str = "",
                    model_config: str | None = None, progress=None) -> Conversion:
    """Write ``out``, a kohya erasure LoRA of the fine-tune ``source`` against ``base`` at ``rank``.

    The metadata holds the method, the erased concept, the source file's name, the base model's name,
    the rank and the extraction error (``erasekit.extraction``), so Load Erasure LoRA and the model card
    say what the file is and how faithful it is. ``progress(message)`` is told each stage.
    """
    from . import lora_extract, lora_io, models

    say = progress or (lambda message: None)
    if rank < 1:
        raise ValueError(f"--rank must be at least 1, not {rank}")
    name = os.path.basename(os.path.normpath(source))
    say(f"reading {name}")
    tensors, meta = read_weights(source)  # first: a refused file costs no model load
    say(f"loading the base model {os.path.basename(os.path.normpath(base))}")
    comps = models.load(base, config=model_config)
    tuned, ignored = unet_weights(tensors, comps.unet, name)
    say(f"SVD of {len(tuned)} weights at rank {rank}")
    ext = lora_extract.extract_lora(comps.unet.state_dict(), tuned, rank=rank)
    if not ext.lora:
        raise ModelFileError(f"'{name}' does not differ from the base model in any layer a LoRA can hold; it is the "
                             "base model itself, or only biases and norms were fine-tuned.")
    errors = sorted(ext.errors.values())
    worst = sorted(ext.errors.items(), key=lambda kv: -kv[1])[:5]
    report = {"source": name, "rank": rank, "layers": len(ext.lora), "max_error": round(ext.max_error, 6),
              "mean_error": round(sum(errors) / len(errors), 6), "median_error": round(statistics.median(errors), 6),
              "worst": [[m, round(e, 6)] for m, e in worst], "not_in_lora": sorted(ext.skipped)}
    method = method or meta.get("erasekit.method", "")
    concept = concept or meta.get("erasekit.erased_concept", "")
    base_name = os.path.basename(os.path.normpath(base))
    path = lora_io.save_lora(
        ext.lora, out, comps.architecture, erased_concept=concept, method=method, base_model=base_name,
        config={"convert": report, "base": base_name},
        description=(f"Erases '{concept}' from {comps.architecture.title} ({method or 'method not given'}); "
                     f"converted from '{name}' by SVD at rank {rank}, max relative error {ext.max_error:.4f}."),
        extra_metadata={"erasekit.source_file": name,
                        "erasekit.extraction": json.dumps({k: report[k] for k in ("rank", "max_error", "mean_error")})})
    return Conversion(path, rank, len(ext.lora), ext.max_error, report["mean_error"], report["median_error"], worst,
                      dict(ext.skipped), ignored)
