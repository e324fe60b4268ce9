"""Read weight files safely and tell which architecture they belong to.

Only safetensors is read: a ``.ckpt`` / ``.pt`` / ``.bin`` file is a pickle that can run code
when loaded, so it is refused with a message saying how to convert it. Detection looks at key
names and tensor shapes from the file header alone (no tensor is read), so it is cheap even
for a 7 GB SDXL checkpoint.

Architectures are named as kohya's ``ss_base_model_version`` names them (A1111 and ComfyUI
read that field), plus ``toy`` for the project's own toy model.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from .errors import ArchitectureError, ModelFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


@dataclass(frozen=True)
class Architecture:
    """A base-model family, as far as LoRAs, embeddings and layer names are concerned."""

    name: str  # kohya ss_base_model_version: sd_v1, sd_v2, sdxl_base_v1-0, toy
    title: str  # what a person reads: "Stable Diffusion 1.x"
    modelspec: str  # modelspec.architecture prefix, "/lora" is appended for LoRAs
    text_widths: tuple[int, ...]  # hidden width of each text encoder, in order

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention keys' input (SDXL concatenates its two encoders)."""
        return sum(self.text_widths)


def sd_v1(width: int = 768) -> Architecture:
    return Architecture("sd_v1", "Stable Diffusion 1.x", "stable-diffusion-v1", (width,))


def sd_v2(width: int = 1024) -> Architecture:
    return Architecture("sd_v2", "Stable Diffusion 2.x", "stable-diffusion-v2-512", (width,))


def sdxl(widths: tuple[int, int] = (768, 1280)) -> Architecture:
    return Architecture("sdxl_base_v1-0", "Stable Diffusion XL", "stable-diffusion-xl-v1-base", widths)


def toy(width: int) -> Architecture:
    return Architecture("toy", "Erasekit toy model", "erasekit-toy-v1", (width,))


# ----------------------------------------------------------------------------- file access


def check_readable(path: str, what: str = "weights file") -> str:
    """Return ``path`` if it is an existing safetensors file, else raise a one-sentence error."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"The {what} '{path}' does not exist; check the path or pick another file.")
    if os.path.isdir(path):
        raise ModelFileError(f"The {what} '{path}' is a folder, but a .safetensors file was expected.")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ModelFileError(
            f"The {what} '{path}' is a pickle file, which can run code when loaded; Erasekit loads "
            ".safetensors only (convert it once with a trusted tool, e.g. ComfyUI's CheckpointSave)."
        )
    return path


def parameter_count(path: str) -> int:
    """Number of weights in a .safetensors file, or in all of them under a folder (a diffusers
    model), read from the headers alone."""
    import math

    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                                                  if f.endswith(".safetensors")]
    return sum(math.prod(shape) for f in files for shape in read_header(f)[0].values())


def read_header(path: str, what: str = "weights file") -> tuple[dict[str, list[int]], dict[str, str]]:
    """Shapes of all tensors and the ``__metadata__`` of a safetensors file, without reading data.

    Returns:
        (shapes, metadata): ``{key: [d0, d1, ...]}`` and the string-to-string metadata.
    """
    check_readable(path, what)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            if n <= 1 or n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        shapes = {}
        for key, info in header.items():
            start, end = info["data_offsets"]
            if end > size - 8 - n or start > end:
                raise ValueError(f"tensor '{key}' points past the end of the file (truncated download?)")
            shapes[key] = list(info["shape"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ModelFileError(
            f"The {what} '{path}' is not a valid safetensors file ({err}); it is probably corrupt or "
            "incomplete: download or export it again."
        ) from None
    return shapes, metadata


def load_file(path: str, what: str = "weights file", device: str = "cpu"):
    """Load all tensors of a safetensors file: ``(state_dict, metadata)``, with clear errors."""
    import safetensors.torch

    _, metadata = read_header(path, what)  # validates the header first, with a readable error
    try:
        return safetensors.torch.load_file(path, device=device), metadata
    except Exception as err:  # safetensors raises its own SafetensorError / OSError variants
        raise ModelFileError(
            f"The {what} '{path}' could not be read ({err}); it is probably corrupt: download or export it again."
        ) from None


def save_file_atomic(tensors: dict, path: str, metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file via a temporary file and a rename, so a crash or a full disk
    never leaves a half-written file under the final name."""
    import safetensors.torch

    return _write_atomic(path, lambda tmp: safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


def write_text_atomic(text: str, path: str) -> str:
    """:func:`save_file_atomic` for a text file (a model card, a config)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return _write_atomic(path, write)


def _write_atomic(path, write) -> str:
    from safetensors import SafetensorError  # safetensors reports its own I/O errors ("File too large") as this

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ModelFileError(f"Could not write '{path}' ({write_error_reason(err)}); free disk space or pick another "
                             "folder.") from None
    return path


def write_error_reason(err: Exception) -> str:
    """"No space left on device" from an OSError, or from safetensors' "Error while serializing: I/O error:
    No space left on device (os error 28)"."""
    return getattr(err, "strerror", None) or str(err).removeprefix("Error while serializing: ").removeprefix("I/O error: ")


# ----------------------------------------------------------------------------- detection

LDM_UNET = "model.diffusion_model."


def detect_architecture(shapes: dict[str, list[int]], source: str = "this model") -> Architecture:
    """Tell the architecture of a single-file checkpoint or a diffusers UNet state dict.

    Structure decides, not widths, so randomly initialised tiny models of the real layouts are
    recognised like the real ones:
      - SDXL: a second text encoder (``conditioner.embedders.1``) or an ``add_embedding``/``label_emb``.
      - SD2.x: an OpenCLIP text encoder (``cond_stage_model.model``) or linear ``proj_in``.
      - SD1.x: a CLIP text encoder (``cond_stage_model.transformer``) with conv ``proj_in``.
    """
    keys = shapes.keys()

    def first(*prefixes: str) -> str | None:
        return next((k for k in keys if k.startswith(prefixes)), None)

    if first(LDM_UNET):  # original (LDM) single-file checkpoint
        k = first(LDM_UNET + "input_blocks.") and next(
            (k for k in keys if k.startswith(LDM_UNET) and k.endswith("attn2.to_k.weight")), None
        )
        if k is None:
            raise ArchitectureError(f"'{source}' has a UNet without cross-attention; it is not a Stable Diffusion text-to-image checkpoint.")
        context = shapes[k][1]
        if first("conditioner.embedders.1.") or first(LDM_UNET + "label_emb."):
            w1 = _width(shapes, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight")
            w2 = _width(shapes, "conditioner.embedders.1.model.ln_final.weight")
            return sdxl((w1, w2) if w1 and w2 else (context - 1280, 1280))
        if first("cond_stage_model.model."):
            return sd_v2(context)
        proj = next((k for k in keys if k.startswith(LDM_UNET) and k.endswith("proj_in.weight")), None)
        if first("cond_stage_model.transformer.") or (proj and len(shapes[proj]) == 4):
            return sd_v1(context)
        if proj and len(shapes[proj]) == 2:
            return sd_v2(context)
    if "conv_in.weight" in shapes:  # a diffusers UNet state dict
        k = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
        if k is None:
            raise ArchitectureError(f"'{source}' has a UNet without cross-attention; it is not a text-to-image UNet.")
        context = shapes[k][1]
        if first("add_embedding."):
            return sdxl((context - 1280, 1280) if context > 1280 else (context // 2, context - context // 2))
        proj = next((k for k in keys if k.endswith("proj_in.weight")), None)
        return sd_v2(context) if proj and len(shapes[proj]) == 2 else sd_v1(context)
    raise ArchitectureError(
        f"'{source}' is not a checkpoint of a known architecture: expected Stable Diffusion 1.x, 2.x or XL "
        "weights (keys 'model.diffusion_model.*' in a single file, or a diffusers UNet)."
    )


def _width(shapes: dict[str, list[int]], key: str) -> int | None:
    return shapes[key][0] if key in shapes else None
