"""A user's forget / preserve folders (what people actually have on disk), the mask source settled
before any sampling, and a data cache that notices changed inputs."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from erasekit import models
from erasekit.erase import data as data_module
from erasekit.erase.data import DataConfig, build_erase_data
from erasekit.erase.images import read_folder
from erasekit.errors import ErasekitError


@pytest.fixture(scope="module")
def comps():
    from erasekit.toyworld.model import build_toy_pipeline

    pipe = build_toy_pipeline(0, tiny=True)
    return models.from_modules(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.scheduler)


def _size(comps):
    return comps.unet.config.sample_size * 2 ** (len(comps.vae.config.block_out_channels) - 1)


def _square_mask(w, h, value=255, box=(0.25, 0.25, 0.75, 0.75)):
    m = np.zeros((h, w), np.uint8)
    m[int(box[1] * h):int(box[3] * h), int(box[0] * w):int(box[2] * w)] = value
    return m


def test_folder_of_real_world_files(comps, tmp_path):
    """Upper-case names, 0/1 masks, masks in an alpha channel, 16-bit greyscale, transparency, a
    non-square JPEG turned by its EXIF tag, a caption with a byte-order mark."""
    S = _size(comps)
    rng = np.random.default_rng(0)
    rgb = (rng.random((S, S, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "A.PNG")
    Image.fromarray(_square_mask(S, S, value=1)).save(tmp_path / "A_MASK.PNG")  # numpy's 0 / 1 mask
    (tmp_path / "A.TXT").write_bytes("\ufeffa red circle on a dotted background".encode("utf-8"))
    Image.fromarray(rgb).save(tmp_path / "b.png")
    alpha = np.dstack([np.full((S, S, 3), 255, np.uint8), _square_mask(S, S, box=(0, 0, 0.5, 1))])
    Image.fromarray(alpha, "RGBA").save(tmp_path / "b_mask.png")  # white everywhere, the shape in alpha
    Image.fromarray(np.full((S, S), 0x8000, np.uint16)).save(tmp_path / "c.png")  # 16-bit mid grey
    see_through = np.zeros((S, S, 4), np.uint8)  # fully transparent black: white once flattened
    Image.fromarray(see_through, "RGBA").save(tmp_path / "d.png")
    wide = np.zeros((S, 2 * S, 3), np.uint8)
    wide[:, S // 2:3 * S // 2] = 255  # a white centre between black sides
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": stored lying on its side
    Image.fromarray(np.rot90(wide)).save(tmp_path / "e.jpg", exif=exif, quality=95)

    Image.fromarray(rgb).save(tmp_path / "f.png")  # its mask: half the resolution, 16 bits, 0 / 1
    Image.fromarray(_square_mask(S // 2, S // 2, value=1).astype(np.uint16)).save(tmp_path / "f_mask.png")
    Image.fromarray(rgb).save(tmp_path / "g.png")  # its mask: white on opaque black inside a transparent margin
    layer = np.zeros((S, S, 4), np.uint8)
    layer[2:-2, 2:-2, 3] = 255
    layer[..., :3] = _square_mask(S, S)[..., None]
    Image.fromarray(layer, "RGBA").save(tmp_path / "g_mask.png")
    images, masks, captions, has_mask, sizes = read_folder(comps, str(tmp_path), masks=True, caption="red circle")
    assert has_mask[5:] == [True, True] and 0.2 < masks[5].mean() < 0.3 and 0.2 < masks[6].mean() < 0.3
    images, masks, captions, has_mask, sizes = images[:5], masks[:5], captions[:5], has_mask[:5], sizes[:5]
    assert images.shape == (5, 3, S, S) and masks.shape == (5, 1, S, S)
    assert has_mask == [True, True, False, False, False]
    assert captions == ["a red circle on a dotted background"] + ["red circle"] * 4
    assert 0.2 < masks[0].mean() < 0.3  # the 0 / 1 square, not nothing
    assert masks[1][0, :, : S // 2].all() and not masks[1][0, :, S // 2:].any()  # the alpha's left half
    assert abs(images[2].mean().item() - 0x8000 / 65535) < 0.01  # mid grey, not white
    assert images[3].min() == 1.0  # transparency on white
    assert images[4].mean() > 0.97  # upright, then the white centre cropped out of the wide image
    assert sizes[4] == (S, 2 * S, 0, S // 2)  # its size and crop, for SDXL's size ids


@pytest.mark.parametrize("case, message", [
    ("corrupt", "Cannot read the image '.*x.png'"),
    ("empty mask", "The mask '.*x_mask.png' marks nothing"),
    ("mask shape", "The mask '.*x_mask.png' is 8x16, its image 32x32; make the mask the image's shape"),
    ("caption", "Cannot read the caption '.*x.txt'.*UTF-8"),
])
def test_bad_files_are_named(comps, tmp_path, case, message):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    if case == "corrupt":
        data = (tmp_path / "x.png").read_bytes()
        (tmp_path / "x.png").write_bytes(data[: len(data) // 2])
    elif case == "empty mask":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "x_mask.png")
    elif case == "mask shape":
        Image.fromarray(np.full((16, 8), 255, np.uint8)).save(tmp_path / "x_mask.png")
    else:
        (tmp_path / "x.txt").write_bytes(b"\xff\xfe\x00 caf\xe9")
    with pytest.raises(ErasekitError, match=message):
        read_folder(comps, str(tmp_path), masks=True, caption="red circle")


def test_mask_source_is_checked_before_sampling(tmp_path, monkeypatch):
    """A missing NudeNet or a guideline file for another model is said before a single image is drawn."""
    from erasekit import tiny

    parts = tiny.build("sd_v1", seed=0)
    from diffusers import DDIMScheduler
    from transformers import AutoTokenizer

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tok = AutoTokenizer.from_pretrained(os.path.join(repo, "models", "toy", "tokenizer"))
    sd1 = models.from_modules(parts["unet"], parts["text_encoder"], tok, parts["vae"], DDIMScheduler())
    monkeypatch.setattr(data_module, "_generate_forget", lambda *a, **k: pytest.fail("sampled before the check"))
    monkeypatch.setitem(sys.modules, "nudenet", None)  # not installed
    with pytest.raises(ErasekitError, match="Nudity masks need NudeNet"):
        build_erase_data(sd1, "nudity", DataConfig(), log=lambda m: None)
    # ... but a folder whose images all have their masks needs no detector
    (tmp_path / "f").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "f" / "a.png")
    Image.fromarray(_square_mask(32, 32)).save(tmp_path / "f" / "a_mask.png")
    data = build_erase_data(sd1, "nudity", DataConfig(forget_dir=str(tmp_path / "f")), log=lambda m: None)
    assert len(data.forget) == 1
    toy_guideline = os.path.join(repo, "models", "guideline", "toy-red-circle.safetensors")
    with pytest.raises(ErasekitError, match="width|made for"):
        build_erase_data(sd1, "red circle", DataConfig(mask_from="guideline", guideline=toy_guideline), log=lambda m: None)


def test_cache_notices_changed_files(comps, tmp_path):
    forget, keep = tmp_path / "forget", tmp_path / "keep"
    forget.mkdir(), keep.mkdir()
    S = _size(comps)
    Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(forget / "a.png")
    Image.fromarray(_square_mask(S, S)).save(forget / "a_mask.png")
    Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(keep / "k.png")
    cfg = DataConfig(forget_dir=str(forget), preserve_dir=str(keep), cache=str(tmp_path / "data.safetensors"))
    first = build_erase_data(comps, "red circle", cfg, log=lambda m: None)
    said = []
    again = build_erase_data(comps, "red circle", cfg, log=said.append)
    assert "from " + cfg.cache in said[0] and torch.equal(again.forget.masks, first.forget.masks)  # served from the cache
    Image.fromarray(_square_mask(S, S, box=(0, 0, 1, 0.5))).save(forget / "a_mask.png")  # repainted
    st = os.stat(forget / "a_mask.png")
    os.utime(forget / "a_mask.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    said.clear()
    fixed = build_erase_data(comps, "red circle", cfg, log=said.append)
    assert not any("from " + cfg.cache in m for m in said)
    assert not torch.equal(fixed.forget.masks, first.forget.masks)


def test_seed_flag_draws_the_data_too():
    from trainer.arguments import build_parser
    from trainer.runner import resolve

    args = build_parser().parse_args(["train", "--target", "red circle", "--seed", "3"])
    args.out, args.base = "runs/x", "models/toy"
    tables = resolve(args, "object", True)
    assert tables["train"]["seed"] == 3 and tables["data"]["seed"] == 3
