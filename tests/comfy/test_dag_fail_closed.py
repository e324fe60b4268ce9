"""Detect-and-Guide fails closed in real ComfyUI: a detection map that cannot be computed stops the
sampling with a sentence (or, when the user chooses, guides the whole image); never plain CFG."""

import numpy as np
import pytest
from PIL import Image

from tools.graphs import dag_graph


def _nan_cams(monkeypatch):
    """CAMs that are all NaN, in patches installed from now on (the graphs below use node settings no
    other test uses, so ComfyUI's cache cannot hand back a model patched before)."""
    import torch

    from erasekit.dag import detect

    cam = detect.guideline_cam
    monkeypatch.setattr(detect, "guideline_cam", lambda *a: torch.full_like(cam(*a), float("nan")))


def test_a_non_finite_detection_map_stops_the_sampling(comfy, toy_in_comfy, monkeypatch):
    _nan_cams(monkeypatch)
    graph = dag_graph(toy_in_comfy, "a red circle", "tiny-red-circle.safetensors", "red circle, fail closed", steps=4)
    with pytest.raises(RuntimeError, match="could not compute the detection map .* stopped instead of sampling unguided"):
        comfy.run(graph)


def test_guide_whole_image_when_detection_fails(comfy, toy_in_comfy, monkeypatch):
    _nan_cams(monkeypatch)
    graph = dag_graph(toy_in_comfy, "a red circle", "tiny-red-circle.safetensors", "red circle, fail closed", steps=4,
                      seed=2)
    graph["12"]["inputs"]["if_detection_fails"] = "guide whole image"
    out = comfy.run(graph)
    plain, guided = (np.asarray(Image.open(comfy.output_path(out[n]["images"][0]))) for n in ("9", "19"))
    assert not np.array_equal(plain, guided)  # guided, not plain CFG
