"""Concept masks for forget images where no toy judge exists: NudeNet boxes, a guideline
embedding's detection map, or the whole image (erasekit/erase/masks.py)."""

import os

import numpy as np
import pytest
import torch

from erasekit.erase.masks import boxes_to_mask, choose_source
from erasekit.errors import ErasekitError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("one_thread")


def test_boxes_fill_the_exposed_classes_above_the_score():
    dets = [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.8, "box": [2, 1, 3, 2]},  # x 2-4, y 1-2
            {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 8, 8]},  # not nudity
            {"class": "BUTTOCKS_EXPOSED", "score": 0.3, "box": [0, 5, 2, 2]}]  # below the score
    m = boxes_to_mask(dets, 6, 8)
    want = np.zeros((6, 8), bool)
    want[1:3, 2:5] = True
    assert np.array_equal(m, want)


def test_source_choice_and_its_errors():
    assert choose_source("auto", "nudity", None) == "nudenet"
    assert choose_source("auto", "Van Gogh style", None) == "full"
    assert choose_source("auto", "pikachu", "g.safetensors") == "guideline"
    assert choose_source("full", "nudity", None) == "full"
    with pytest.raises(ErasekitError, match="--guideline"):
        choose_source("guideline", "pikachu", None)
    with pytest.raises(ErasekitError, match="Unknown mask source 'sam'"):
        choose_source("sam", "x", None)


def test_nudenet_runs_and_finds_nothing_in_toy_scenes():
    """The real detector (its bundled ONNX model) on rendered scenes: no exposed parts, so
    whole-image masks and found = False."""
    pytest.importorskip("nudenet")
    from erasekit.erase.masks import nudenet_masks
    from erasekit.toyworld.scenes import render_scene, upscale_for_display

    imgs = torch.stack([torch.from_numpy(upscale_for_display(render_scene(i).image)).permute(2, 0, 1).float() / 255
                        for i in range(2)])
    masks, found = nudenet_masks(imgs)
    assert masks.shape == (2, 1, *imgs.shape[-2:]) and not found.any() and bool((masks == 1).all())


def test_guideline_masks_sit_inside_the_judges_masks():
    """On the bundled toy model, the shipped red-circle guideline masks the images the model
    draws: found in every image, overlapping the judge's exact mask in each, and most of the
    masked pixels inside it (the detector's IoU is ~0.34: its maps are coarse, 8x8 and 4x4)."""
    from erasekit import models
    from erasekit.erase.data import DataConfig, build_erase_data

    comps = models.load(os.path.join(REPO, "models", "toy"))
    base = dict(forget_images=4, neighbours=0, unrelated=0, images_per_concept=1)
    exact = build_erase_data(comps, "red circle", DataConfig(**base), log=lambda m: None).forget.masks >= 0.5
    logs = []
    guided = build_erase_data(comps, "red circle", DataConfig(
        **base, mask_from="guideline", guideline=os.path.join(REPO, "models", "guideline", "toy-red-circle.safetensors")),
        log=logs.append).forget.masks >= 0.5
    assert any("found the concept in 4 of 4" in m for m in logs), logs
    inter = (exact & guided).flatten(1).sum(1).float()
    assert (inter > 0).all()
    assert inter.sum() / guided.sum() >= 0.6  # precision over the four images
