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


def check_safetensors_folder(folder: str, what: str = "model folder") -> None:
    """Before a diffusers / transformers loader reads a model folder: refuse it when a part
    (``unet/``, ``text_encoder/``, ...) has its weights only as a pickle (``diffusion_pytorch_model.bin``),
    and check the header of every ``.safetensors`` file in it (:func:`read_header`)."""
    folder = os.fspath(folder)
    for sub in sorted(os.listdir(folder)):
        part = os.path.join(folder, sub)
        names = sorted(os.listdir(part)) if os.path.isdir(part) else []
        pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
        if pickles and not any(n.lower().endswith(".safetensors") for n in names):
            raise ModelFileError(
                f"The {what} '{folder}' has its '{sub}' weights only as '{pickles[0]}', a pickle file, which can run "
                "code when loaded; Erasekit loads .safetensors only (convert the model once with a trusted tool, "
                "e.g. diffusers' save_pretrained(safe_serialization=True)).")
        for name in names:
            if name.lower().endswith(".safetensors"):
                read_header(os.path.join(part, name), f"'{sub}' weights file")


def parameter_count(path: str) -> int:
    """Number of weights in a .safetensors file, or in all of them under a folder (a diffusers
    model), read from the headers alone."""
    import math

    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                                                  if f.endswith(".safetensors")]
    return sum(math.prod(shape) for f in files for shape in read_header(f)[0].values())


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_HEADER_DEPTH = 64  # safetensors (serde_json) refuses ~127 levels; a real header has 3
# bits per element of the dtypes of the safetensors format (0.8) that torch can hold (no F6_E2M3, F6_E3M2)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4}
_U64 = 2**64


def read_header(path: str, what: str = "weights file") -> tuple[dict[str, list[int]], dict[str, str]]:
    """Shapes of all tensors and the ``__metadata__`` of a safetensors file, without reading data.

    The header is checked against the format (:func:`parse_header`): a file the safetensors
    library would refuse is refused here, with one sentence naming it.

    Returns:
        (shapes, metadata): ``{key: [d0, d1, ...]}`` and the string-to-string metadata.
    """
    entries, metadata = read_entries(path, what)
    return {key: shape for key, (_, shape, _) in entries.items()}, metadata


def read_entries(path: str, what: str = "weights file") -> tuple[dict[str, tuple], dict[str, str]]:
    """:func:`read_header` with each tensor's dtype and byte range: ``{key: (dtype, shape, (begin, end))}``."""
    check_readable(path, what)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("the file is empty" if not raw_len else "file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            raw = f.read(n)
        return parse_header(raw, size - 8 - n)
    except OSError as err:
        raise ModelFileError(f"The {what} '{path}' could not be read ({err.strerror or err}); check that it is a "
                             "file you may read.") from None
    except (ValueError, KeyError, TypeError, RecursionError, OverflowError, struct.error) as err:
        raise ModelFileError(
            f"The {what} '{path}' is not a valid safetensors file ({_reason(err)}); it is probably corrupt or "
            "incomplete: download or export it again."
        ) from None


def _reason(err: Exception) -> str:
    if isinstance(err, RecursionError):
        return "its header is nested too deeply"
    if isinstance(err, UnicodeError):
        return "its header is not UTF-8 text"
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def parse_header(raw: bytes, data_size: int) -> tuple[dict[str, tuple], dict[str, str]]:
    """Check a safetensors header against the format and return ``(entries, metadata)``.

    The rule: accept nothing the safetensors library refuses. UTF-8 JSON (no NaN / Infinity,
    no duplicate keys, at most :data:`MAX_HEADER_DEPTH` levels) holding one object; its
    ``__metadata__`` maps strings to strings; every other key is a tensor with a known
    ``dtype``, a ``shape`` of non-negative ints and ``data_offsets`` [begin, end] whose length is
    the shape's element count times the dtype's size; the tensors tile the data area exactly
    (no gap, no overlap, nothing past its end, nothing after the last one). Raises ValueError.
    """
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant,
                        parse_float=_finite_float)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    _check_depth(header)
    json.dumps(header, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\ud800) is not UTF-8 either
    metadata = _metadata_of(header.pop("__metadata__", None))
    entries = {key: _tensor_entry(key, info) for key, info in header.items()}
    _check_tiling(entries, data_size)
    return entries, metadata


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key '{next(k for k in keys if keys.count(k) > 1)}' appears twice in the header")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"'{name}' is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _check_depth(header: dict) -> None:
    """No value nested deeper than :data:`MAX_HEADER_DEPTH` (safetensors' JSON reader stops at ~127)."""
    stack = [(header, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_HEADER_DEPTH:
            raise ValueError(f"its header is nested more than {MAX_HEADER_DEPTH} levels deep")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def _metadata_of(value) -> dict[str, str]:
    """``__metadata__``: absent or null, or an object of strings."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("'__metadata__' must map text to text")
    return value


def _tensor_entry(key: str, info) -> tuple[str, list[int], tuple[int, int]]:
    """``(dtype, shape, (begin, end))`` of one tensor's header entry, checked."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ValueError(f"tensor '{key}' lacks its dtype, shape or data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ValueError(f"tensor '{key}' has an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise ValueError(f"tensor '{key}' has a shape that is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise ValueError(f"tensor '{key}' has data_offsets that are not two non-negative integers")
    count = 1
    for d in shape:  # as safetensors does: an overflow on the way is refused, even if a later 0 would cancel it
        count *= d
        if count >= _U64:
            raise ValueError(f"tensor '{key}' has a shape too large to address")
    bits = count * DTYPE_BITS[dtype]
    begin, end = offsets
    if end < begin:
        raise ValueError(f"tensor '{key}' has data_offsets that end before they begin")
    if bits >= _U64 or bits % 8 or end - begin != bits // 8:
        raise ValueError(f"tensor '{key}' holds {end - begin} bytes, not what shape {shape[:8]} of {dtype} needs")
    return dtype, list(shape), (begin, end)


def _is_u64(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64


def _check_tiling(entries: dict, data_size: int) -> None:
    """The tensors' byte ranges cover the data area exactly, in order, without gaps or overlaps."""
    expected = 0
    for key, (_, _, (begin, end)) in sorted(entries.items(), key=lambda item: item[1][2]):
        if end > data_size:
            raise ValueError(f"tensor '{key}' points past the end of the file (truncated download?)")
        if begin != expected:
            raise ValueError(f"tensor '{key}' overlaps another or leaves a gap in the data")
        expected = end
    if expected != data_size:
        raise ValueError(f"{data_size - expected} bytes after the last tensor belong to none (a damaged file?)")


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
    """``write(tmp)`` to a temporary file beside ``path``, synced to disk, renamed over ``path``, and
    the rename synced too: after a crash or a power cut the old file or the whole new one is there.
    On any error (a full disk, Ctrl-C) the temporary file is removed and the old file kept."""
    from safetensors import SafetensorError  # safetensors reports its own I/O errors ("File too large") as this

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates files 0600: another account's ComfyUI could not read them
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_folder(folder)
    except BaseException as err:
        _remove_quietly(tmp)
        if isinstance(err, (OSError, SafetensorError)):
            raise ModelFileError(f"Could not write '{path}' ({write_error_reason(err)}); free disk space or pick "
                                 "another folder.") from None
        raise
    return path


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it, racing other threads' files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def _fsync_file(path: str) -> None:
    """Push a written file's data to the disk (opened for writing: Windows syncs only such handles)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    """Push a rename in ``folder`` to the disk; skipped where a folder cannot be opened (Windows) or
    synced (some network file systems)."""
    import errno

    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


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
