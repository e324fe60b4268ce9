"""Real ComfyUI (unmodified, from the PyPI sdist unpacked by `make setup`), in-process, CPU."""

import os
import sys

import pytest
import torch

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


@pytest.fixture(scope="session")
def tiny_sd1_in_comfy(comfy, sd1_tokenizer):
    """Name of a tiny SD1 diffusers folder registered in ComfyUI's models/diffusers."""
    from erasekit.tiny import save_sd1_folder

    save_sd1_folder(os.path.join(comfy.work_dir, "models", "diffusers", "tiny-sd1"), sd1_tokenizer)
    return "tiny-sd1"


@pytest.fixture(scope="session")
def toy_in_comfy(comfy):
    """A tiny random toy model in ComfyUI's models/diffusers and guideline embeddings for it."""
    from erasekit.dag.guideline import GuidelineEmbedding, encode_phrase
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    pipe = build_toy_pipeline(seed=0, tiny=True)
    save_toy_pipeline(pipe, os.path.join(comfy.work_dir, "models", "diffusers", "toy-dag"))
    gdir = os.path.join(comfy.work_dir, "models", "guideline")
    os.makedirs(gdir, exist_ok=True)
    sink, tokens = encode_phrase(pipe.text_encoder, pipe.tokenizer, "red circle")
    GuidelineEmbedding(tokens, sink, "red circle", "toy", "red circle").save(os.path.join(gdir, "tiny-red-circle.safetensors"))
    # an embedding whose tokens ARE the sink: the raw CAM is K/(K+1) everywhere, a flat map that
    # locates nothing, so A-hat = 0 and DAG must stand down: a never-detecting control
    GuidelineEmbedding(sink[None].repeat(2, 1), sink, "nothing", "toy").save(os.path.join(gdir, "tiny-nothing.safetensors"))
    wide = torch.ones(2, 768)
    GuidelineEmbedding(wide, torch.zeros(768), "nudity", "sd_v1").save(os.path.join(gdir, "sd15-nudity.safetensors"))
    return "toy-dag"


@pytest.fixture(scope="session")
def ncd_cli_lora(tmp_path_factory):
    """An NCD erasure LoRA of the default toy target made by the CLI itself (``python -m trainer train
    --method ncd``, a subprocess) on the bundled toy model with its NCD toy tuning; the data cut to 8
    tuples and 6 images of each preserved concept (measured: the same erasure as the defaults' 16 and
    25, in half the time; about 1 min 15 s of CPU)."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(HERE))
    out = tmp_path_factory.mktemp("ncd-cli") / "run"
    argv = [sys.executable, "-m", "trainer", "train", "--method", "ncd", "--target", "red circle", "--out", str(out),
            "--forget-images", "8", "--images-per-concept", "6", "--sample-every", "0", "--threads", "1"]
    done = subprocess.run(argv, cwd=repo, env={**os.environ, "PYTHONPATH": repo}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    path = out / "erase-red-circle-ncd.safetensors"
    assert path.is_file(), done.stderr[-2000:]
    return path
