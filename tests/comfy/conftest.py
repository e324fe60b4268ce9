"""Real ComfyUI (unmodified, from the PyPI sdist unpacked by `make setup`), in-process, CPU."""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    from tools.comfy_headless import HeadlessComfy

    return HeadlessComfy(str(tmp_path_factory.mktemp("comfy")))


@pytest.fixture(scope="session")
def sd1_tokenizer():
    from transformers import CLIPTokenizer

    from tools.comfy_headless import COMFY_DIR

    # ComfyUI ships SD1's CLIP tokenizer files; tiny SD1 models use them as the real model does.
    return CLIPTokenizer.from_pretrained(os.path.join(COMFY_DIR, "comfy", "sd1_tokenizer"))


def save_tiny_sd1(folder: str, tokenizer, seed: int = 0):
    """A tiny SD1-layout diffusers folder (random weights) for loader and graph tests."""
    from diffusers import StableDiffusionPipeline

    from erasekit import tiny

    p = tiny.build("sd_v1", seed)
    pipe = StableDiffusionPipeline(vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=tokenizer, unet=p["unet"],
                                   scheduler=p["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return p


@pytest.fixture(scope="session")
def tiny_sd1_in_comfy(comfy, sd1_tokenizer):
    """Name of a tiny SD1 diffusers folder registered in ComfyUI's models/diffusers."""
    save_tiny_sd1(os.path.join(comfy.work_dir, "models", "diffusers", "tiny-sd1"), sd1_tokenizer)
    return "tiny-sd1"
