"""`python -m trainer guideline`: a guideline embedding from a user's folder of images and masks."""

import numpy as np
import pytest
import torch


@pytest.fixture
def folders(tmp_path):
    from PIL import Image

    from erasekit.toyworld.scenes import render_scene, upscale_for_display

    forget, preserve = tmp_path / "forget", tmp_path / "preserve"
    forget.mkdir(), preserve.mkdir()
    for i in range(2):
        s = render_scene(i, objects=[("red", "circle")])
        Image.fromarray(upscale_for_display(s.image)).save(forget / f"{i}.png")
        mask = upscale_for_display(np.repeat(s.objects[0].mask[..., None], 3, -1).astype(np.uint8) * 255)
        Image.fromarray(mask[..., 0]).save(forget / f"{i}_mask.png")
        (forget / f"{i}.txt").write_text("a red circle")
        s = render_scene(10 + i, objects=[("blue", "circle")])
        Image.fromarray(upscale_for_display(s.image)).save(preserve / f"{i}.png")
        (preserve / f"{i}.txt").write_text("a blue circle")
    return forget, preserve


def test_guideline_from_folders_loads_back_with_its_gate(tmp_path, folders):
    from erasekit.dag.guideline import GuidelineEmbedding
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline
    from trainer.cli import main

    torch.set_num_threads(1)
    save_toy_pipeline(build_toy_pipeline(seed=0, tiny=True), tmp_path / "toy")
    out = tmp_path / "g" / "red.safetensors"
    rc = main(["guideline", "--target", "red circle", "--base", str(tmp_path / "toy"), "--forget-dir", str(folders[0]),
               "--preserve-dir", str(folders[1]), "--steps", "6", "--out", str(out)])
    assert rc == 0 and out.is_file()
    emb = GuidelineEmbedding.load(str(out))
    assert emb.concept == "red circle" and emb.architecture == "toy" and 0 < emb.gate < 1
    assert emb.info["n_unsafe"] == 2 and emb.info["n_safe"] == 2 and emb.info["steps"] == 6
    # the safe images' captions are the contrast: their words' states, saved with the tokens
    assert emb.contrast_phrases == ["a blue circle"] and emb.contrast.shape == (3, emb.width)
    assert emb.info["contrast_tokens"] == 3
    out2 = tmp_path / "g" / "plain.safetensors"
    assert main(["guideline", "--target", "red circle", "--base", str(tmp_path / "toy"), "--forget-dir", str(folders[0]),
                 "--preserve-dir", str(folders[1]), "--steps", "6", "--contrast", "none", "--out", str(out2)]) == 0
    plain = GuidelineEmbedding.load(str(out2))
    assert plain.contrast is None and plain.contrast_phrases == []
