"""Detect-and-Guide nodes in real ComfyUI graphs on the toy architecture."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from tools.graphs import dag_graph


@pytest.fixture(scope="module")
def toy_in_comfy(comfy):
    """A tiny random toy model in ComfyUI's models/diffusers and guideline embeddings for it."""
    from erasekit.dag.guideline import GuidelineEmbedding, encode_phrase
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    pipe = build_toy_pipeline(seed=0, tiny=True)
    save_toy_pipeline(pipe, os.path.join(comfy.work_dir, "models", "diffusers", "toy-dag"))
    gdir = os.path.join(comfy.work_dir, "models", "guideline")
    os.makedirs(gdir, exist_ok=True)
    sink, tokens = encode_phrase(pipe.text_encoder, pipe.tokenizer, "red circle")
    GuidelineEmbedding(tokens, sink, "red circle", "toy", "red circle").save(os.path.join(gdir, "toy-red-circle.safetensors"))
    # an embedding whose tokens ARE the sink: the CAM is K/(K+1) everywhere, i.e. >= 80% of the
    # image is "edit region" and DAG must stand down (Alg. 1, line 6): a never-detecting control
    GuidelineEmbedding(sink[None].repeat(2, 1), sink, "nothing", "toy").save(os.path.join(gdir, "toy-nothing.safetensors"))
    wide = torch.zeros(2, 768)
    GuidelineEmbedding(wide, torch.zeros(768), "nudity", "sd_v1").save(os.path.join(gdir, "sd15-nudity.safetensors"))
    return "toy-dag"


def _img(comfy, out, node):
    return np.asarray(Image.open(comfy.output_path(out[node]["images"][0])))


def test_nothing_detected_means_bit_identical_plain_cfg(comfy, toy_in_comfy):
    out = comfy.run(dag_graph(toy_in_comfy, "a red circle", "toy-nothing.safetensors", "red circle", steps=8))
    assert np.array_equal(_img(comfy, out, "9"), _img(comfy, out, "19"))


@pytest.mark.parametrize("mode", ["DAG", "SLD", "SEGA"])
def test_every_mode_runs_and_dag_shows_its_maps(comfy, toy_in_comfy, mode):
    graph = dag_graph(toy_in_comfy, "a red circle and a blue square", "toy-red-circle.safetensors", mode=mode, steps=6, seed=3)
    if mode != "DAG":  # detection maps exist only in DAG mode
        del graph["20"], graph["21"]
    out = comfy.run(graph)
    assert _img(comfy, out, "19").shape == (128, 128, 3)
    if mode == "DAG":
        assert _img(comfy, out, "21").shape == (128, 128, 3)


def test_embedding_for_another_model_is_refused_with_a_sentence(comfy, toy_in_comfy):
    with pytest.raises(RuntimeError, match="has width 768 \\(made for sd_v1\\), but this model's text width is 32"):
        comfy.run(dag_graph(toy_in_comfy, "a red circle", "sd15-nudity.safetensors", steps=2))
