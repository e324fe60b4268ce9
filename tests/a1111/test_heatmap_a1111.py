"""Cross-attention heatmaps of chosen words in the real Automatic1111 (scripts/erasekit_heatmap.py)."""

import numpy as np

SCRIPT = "cross-attention heatmap (erasekit)"
BASE = {"prompt": "a red circle and a blue square", "negative_prompt": "", "seed": 3, "steps": 4, "width": 128,
        "height": 128, "batch_size": 2, "cfg_scale": 5.0, "sampler_name": "Euler a"}


def _run(a1111, words):
    payload = dict(BASE, alwayson_scripts={SCRIPT: {"args": [True, words]}})
    return [np.asarray(i.convert("RGB")).astype(int) for i in a1111.txt2img(payload)]


def test_each_image_gets_the_heatmap_of_the_chosen_words(a1111):
    plain = [np.asarray(i.convert("RGB")).astype(int) for i in a1111.txt2img(BASE)]
    circle, square = _run(a1111, "circle"), _run(a1111, "blue square")
    assert len(circle) == len(square) == 4
    assert all(np.array_equal(a, b) for a, b in zip(plain, circle[:2]))  # the images themselves are untouched
    assert all(np.abs(h - img).mean() > 1 for h, img in zip(circle[2:], circle[:2]))  # a map is drawn over each
    assert np.abs(circle[2] - square[2]).mean() > 0.5  # another word, another map


def test_a_word_not_in_the_prompt_gives_the_images_and_a_sentence(a1111):
    res = a1111.post("/sdapi/v1/txt2img", dict(BASE, alwayson_scripts={SCRIPT: {"args": [True, "giraffe"]}}))
    assert len(res["images"]) == 2 and "None of the words 'giraffe' occurs in the prompt" in res["info"]
