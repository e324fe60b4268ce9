"""The image cache: one PNG per (run variant, prompt, seed), written atomically, so a killed run resumes.

A variant is everything that decides an image besides its prompt and seed (model, LoRAs and strengths,
guideline and its settings, sampler); its folder is named by a hash of that description, which is kept
beside the images (``variant.json``). An image's file is named by a hash of (prompt, seed, guidance
scale), so editing the prompt file reuses what is still asked for. A file is either complete or absent:
PNGs are written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(path: str) -> dict:
    """What identifies a weights file cheaply: its absolute path, size and modification time."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ImageCache:
    """The PNGs of one variant under ``root/<hash of description>/``."""

    def __init__(self, root: str, description: dict):
        self.description = description
        self.dir = os.path.join(root, digest(description))
        os.makedirs(self.dir, exist_ok=True)
        meta = os.path.join(self.dir, "variant.json")
        if not os.path.isfile(meta):
            write_atomic(meta, json.dumps(description, indent=1, sort_keys=True, default=str).encode())

    @staticmethod
    def key(prompt: str, seed: int, cfg: float) -> str:
        return digest([prompt, int(seed), float(cfg)])

    def path(self, key: str) -> str:
        return os.path.join(self.dir, f"{key}.png")

    def has(self, key: str, with_meta: bool = False) -> bool:
        """The image is cached (and, with ``with_meta``, what its sampling measured, e.g. a guideline's score)."""
        return os.path.isfile(self.path(key)) and (not with_meta or os.path.isfile(self.meta_path(key)))

    def meta_path(self, key: str) -> str:
        return os.path.join(self.dir, f"{key}.json")

    def put(self, key: str, image: np.ndarray, meta: dict | None = None) -> str:
        """Store a uint8 [H, W, 3] image (temporary file + rename); ``meta`` first, so an image never lacks it."""
        import io

        from PIL import Image

        if meta is not None:
            write_atomic(self.meta_path(key), json.dumps(meta).encode())
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return write_atomic(self.path(key), buf.getvalue())

    def meta(self, key: str) -> dict:
        path = self.meta_path(key)
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def get(self, key: str) -> np.ndarray:
        from PIL import Image

        with Image.open(self.path(key)) as im:
            return np.asarray(im.convert("RGB"))


def write_atomic(path: str, data: bytes) -> str:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path
