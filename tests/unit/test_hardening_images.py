"""A user's image files are decoded only as what the project takes (PNG, JPEG, WebP), never past a
pixel limit, and 16-bit masks are read without float copies of their pixels."""

import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from erasekit import models
from erasekit.erase.images import read_folder
from erasekit.errors import ErasekitError


@pytest.fixture(scope="module")
def comps():
    from erasekit.toyworld.model import build_toy_pipeline

    pipe = build_toy_pipeline(0, tiny=True)
    return models.from_modules(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.scheduler)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (IHDR) claims ``width`` x ``height`` 8-bit grey pixels, with a token of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt, name", [("GIF", "x.png"), ("BMP", "x.jpg"), ("TIFF", "x.webp")])
def test_an_image_of_another_format_is_refused_whatever_its_name(comps, tmp_path, fmt, name):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / name, format=fmt)
    with pytest.raises(ErasekitError, match=f"The image '.*{name}' is not a PNG, JPEG or WebP file") as err:
        read_folder(comps, str(tmp_path), masks=False, caption="x")
    assert "\n" not in str(err.value)


def test_a_mask_of_another_format_is_refused(comps, tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "x_mask.png", format="GIF")
    with pytest.raises(ErasekitError, match="The image '.*x_mask.png' is not a PNG, JPEG or WebP file"):
        read_folder(comps, str(tmp_path), masks=True, caption="x")


def test_a_png_claiming_a_huge_size_is_refused_before_decoding(comps, tmp_path, monkeypatch):
    """8000 x 8000 (64 megapixels): under PIL's own bomb limit (89), over the project's (40)."""
    (tmp_path / "x.png").write_bytes(_png_claiming(8000, 8000))

    def decode(self):
        pytest.fail("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    with pytest.raises(ErasekitError, match="The image '.*x.png' is 8000x8000 pixels, over the limit of 40 megapixels"):
        read_folder(comps, str(tmp_path), masks=False, caption="x")


def test_a_16_bit_mask_is_read_in_integers(comps, tmp_path):
    """A 2048 x 2048 16-bit mask: the concept where it is 65535, nothing else; no float64 copy
    of its pixels (8 bytes each) is ever made on the way to 8 bits."""
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(tmp_path / "x.png")
    mask = np.zeros((2048, 2048), np.uint16)
    mask[512:1536, :1024] = 65535  # the left half of the middle band
    Image.fromarray(mask).save(tmp_path / "x_mask.png")
    assert Image.open(tmp_path / "x_mask.png").mode == "I;16"
    tracemalloc.start()
    try:
        folder = read_folder(comps, str(tmp_path), masks=True, caption="x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    m = folder.masks[0, 0]
    S = m.shape[0]
    assert m[S // 4 : 3 * S // 4, : S // 2].all() and not m[:, S // 2 + 1 :].any() and not m[: S // 4 - 1].any()
    assert peak < 8 * mask.size, f"{peak / mask.size:.1f} bytes per pixel"
