"""A user's image files for the forget and preserve sets: a folder of ``name.png`` (or .jpg / .webp),
an optional ``name_mask.png`` (white, or opaque in its alpha channel, = concept) and ``name.txt``
caption, read the way people actually save them (any case, 0 / 1 or alpha masks, 16-bit, transparency,
EXIF rotation, any aspect ratio), with one sentence naming a file that cannot be used."""

from __future__ import annotations

import os
from typing import NamedTuple

from ..errors import ErasekitError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # the only decoders PIL may run on a user's file
MAX_PIXELS = 40_000_000  # refused before decoding; PIL's own bomb limit is 89 M (warning) / 179 M (error)


class Folder(NamedTuple):
    images: object  # [N, 3, S, S] in [0, 1]
    masks: object  # [N, 1, S, S] of 0 / 1, or None
    captions: list
    has_mask: list  # [N] bool: a _mask file was there
    sizes: list  # [N] (height, width, crop top, crop left): SDXL's size ids for each image


def read_folder(components, folder: str, masks: bool, caption: str) -> Folder:
    """The images of ``folder`` at the model's resolution (:class:`Folder`). ``name_mask.png`` is the mask of ``name.png``
    (white, or opaque in its alpha channel, = concept; a missing one means the whole image, ``has_mask``
    False); ``name.txt`` its caption (default ``caption``). Names match whatever their case. A non-square
    image is scaled to S on its short side and centre-cropped, its mask the same way."""
    import torch

    if not os.path.isdir(folder):
        raise ErasekitError(f"The image folder '{folder}' does not exist; check the path.")
    files = {f.lower(): f for f in os.listdir(folder)}
    names = sorted(f for low, f in files.items() if low.endswith(IMAGE_EXTENSIONS)
                   and not os.path.splitext(low)[0].endswith("_mask"))
    if not names:
        raise ErasekitError(f"The folder '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)}; files named "
                            "*_mask.png are masks); add images or leave the option out to generate them.")
    size = components.unet.config.sample_size * 2 ** (len(components.vae.config.block_out_channels) - 1)
    images, mask_list, captions, has_mask, sizes = [], [], [], [], []
    for name in names:
        stem = os.path.splitext(name)[0]
        img = _open_image(os.path.join(folder, name))
        images.append(_square(img.convert("RGB"), size, "bicubic"))
        _, (left, top) = _crop_box(*img.size, size)
        sizes.append((img.size[1], img.size[0], top, left))
        mask_name = next((files[stem.lower() + "_mask" + e] for e in IMAGE_EXTENSIONS if stem.lower() + "_mask" + e in files), None)
        has_mask.append(masks and mask_name is not None)
        if masks:
            mask_list.append(_read_mask(os.path.join(folder, mask_name), img.size, size) if mask_name
                             else torch.ones(1, size, size))
        text = files.get(stem.lower() + ".txt")
        captions.append(_read_caption(os.path.join(folder, text)) if text else caption)
    return Folder(torch.stack(images), torch.stack(mask_list) if masks else None, captions, has_mask, sizes)


def _open_image(path: str):
    """A PIL image, upright (EXIF orientation applied), 8 bits per channel, transparency flattened on
    white; one sentence naming the file when it cannot be read. Only the decoders of
    :data:`IMAGE_FORMATS` run, whatever the file's name says, and an image over :data:`MAX_PIXELS` is
    refused from its header, before any pixel is decoded."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=list(IMAGE_FORMATS)) as f:
                _check_pixels(f.size, path)
                img = ImageOps.exif_transpose(f)
                img.load()
    except UnidentifiedImageError:
        raise ErasekitError(f"The image '{path}' is not a PNG, JPEG or WebP file, whatever its name says; save it "
                            "as one of those, or remove it.") from None
    except ErasekitError:
        raise
    except Exception as err:  # decoders of untrusted bytes raise OSError, SyntaxError, zlib.error, bomb errors...
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ErasekitError(f"Cannot read the image '{path}' ({reason}); replace or remove it.") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: convert("L") would clip, not scale
        img = _grey_to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB") \
            if rgba.getextrema()[3][0] < 255 else rgba.convert("RGB")
        img.info["alpha"] = rgba.getchannel("A")  # a mask may be drawn in its alpha channel
    return img


def _check_pixels(size: tuple, path: str) -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise ErasekitError(f"The image '{path}' is {w}x{h} pixels, over the limit of {MAX_PIXELS // 10**6} "
                            "megapixels; scale it down or remove it.")


def _grey_to_8bit(img):
    """A 16-bit (or 32-bit integer) greyscale image as 8 bits, in integer arithmetic (no float copy of the
    pixels): values above 255 are 16-bit levels, scaled by 255/65535 and rounded; a 0 / 1 (or 0..255)
    mask saved as 16 bits keeps its values."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(img)
    wide = arr.astype(np.uint32) if arr.dtype.kind == "u" else np.clip(arr, 0, 65535).astype(np.uint32)
    del arr
    if wide.max() > 255:
        wide *= 255
        wide += 32767
        wide //= 65535
    return Image.fromarray(wide.astype(np.uint8))


def _square(img, size: int, resample: str):
    """[C, S, S] in [0, 1]: the short side scaled to ``size``, the long side centre-cropped."""
    import numpy as np
    import torch
    from PIL import Image

    (nw, nh), (left, top) = _crop_box(*img.size, size)
    resample = Image.BICUBIC if resample == "bicubic" else Image.NEAREST
    img = img.resize((nw, nh), resample)
    arr = np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return torch.from_numpy(arr if arr.ndim == 3 else arr[..., None]).permute(2, 0, 1)


def _crop_box(w: int, h: int, size: int):
    """((new width, new height), (left, top)): the short side scaled to ``size``, the centre cut out."""
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return (nw, nh), ((nw - size) // 2, (nh - size) // 2)


def _read_mask(path: str, image_size: tuple, size: int):
    """A mask [1, S, S] of 0 / 1: white (> half) or, where the mask has a varying alpha channel, opaque
    = concept; a 0 / 1 mask (as numpy writes them) counts too. Refused when empty or of another size."""
    from PIL import Image, ImageChops

    img = _open_image(path)
    (w, h), (iw, ih) = img.size, image_size
    if abs(w * ih - h * iw) > max(w, h, iw, ih):  # another shape; another resolution of the same shape is fine
        raise ErasekitError(f"The mask '{path}' is {w}x{h}, its image {iw}x{ih}; make the mask the image's shape.")
    grey = img.convert("L")
    alpha = img.info.get("alpha")
    if alpha is not None:  # white where opaque: "white on black" and "white strokes on a transparent layer" alike
        grey = ImageChops.multiply(grey, alpha)
    if grey.getextrema()[1] == 0:
        raise ErasekitError(f"The mask '{path}' marks nothing (all black); paint the concept white, or delete the "
                            "mask to use the whole image.")
    m = _square(grey.resize((iw, ih), Image.NEAREST), size, "nearest")
    m = (m > (0.5 if m.max() > 1.5 / 255 else 0.0)).float()
    if not m.any():
        raise ErasekitError(f"The mask '{path}' marks only what the centre crop of its {iw}x{ih} image cuts off; "
                            "crop the image around the concept.")
    return m


def _read_caption(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:  # utf-8-sig: Windows editors' byte-order mark is dropped
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ErasekitError(f"Cannot read the caption '{path}' ({err}); save it as UTF-8 text.") from None
