"""Toy-world scenes: determinism, exact masks, layout, captions, sampler, speed."""
from __future__ import annotations

import time

import numpy as np
import pytest

from erasekit.toyworld import scenes as S
from erasekit.toyworld import vocab as V


@pytest.fixture(scope="module")
def batch():
    return S.render_batch(seed=4242, n=300)


def _alpha(scene: S.Scene, colour: str) -> np.ndarray:
    """Per-pixel share of `colour` over the scene's background grey: float [H, W]."""
    grey = np.where(scene.pattern[..., None], np.float64(V.BACKGROUND_PATTERN), np.float64(V.BACKGROUND_BASE))
    d = np.float64(V.COLOURS[colour]) - grey
    return ((scene.image - grey) * d).sum(-1) / (d * d).sum(-1)


def test_deterministic_by_seed():
    a, b, c = S.render_scene(123), S.render_scene(123), S.render_scene(124)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.background == b.background
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    assert not np.array_equal(a.image, c.image)
    i1, c1, _ = S.render_batch(7, 20)
    i2, c2, _ = S.render_batch(7, 20)
    assert np.array_equal(i1, i2) and c1 == c2


def test_batch_shapes_and_counts(batch):
    images, captions, scenes = batch
    assert images.shape == (300, 32, 32, 3) and images.dtype == np.uint8
    assert len(captions) == len(scenes) == 300
    counts = np.bincount([len(s.objects) for s in scenes], minlength=4)
    assert counts[0] == 0 and counts[1:].min() > 30  # 1, 2 and 3 objects all occur
    assert {s.background for s in scenes} == set(V.STYLES)
    assert any(o.character for s in scenes for o in s.objects)


def test_masks_are_exact_coverage_over_half(batch):
    """Mask pixels are >= half object colour, the ring just outside is < half (soft edges exist)."""
    _, _, scenes = batch
    soft = 0
    for scene in scenes:
        for obj in scene.objects:
            if obj.character:
                continue
            a = _alpha(scene, obj.colour)
            ring = S._grow(obj.mask, 1) & ~obj.mask
            assert (a[obj.mask] >= 0.47).all()  # coverage is a multiple of 1/16; uint8 rounding
            assert (a[ring] < 0.5).all()
            soft += int(((a > 0.05) & (a < 0.95))[S._grow(obj.mask, 1)].sum())
            cov = S.shape_coverage(obj.shape, obj.size, obj.centre)
            assert np.array_equal(obj.mask, cov >= 0.5)
            assert (scene.image[cov == 1] == V.COLOURS[obj.colour]).all()
    assert soft > 1000  # edges are antialiased


def test_character_parts(batch):
    _, _, scenes = batch
    chars = [o for s in scenes for o in s.objects if o.character]
    assert chars
    for o in chars:
        ch = V.CHARACTERS[o.character]
        body, inner = o.parts
        assert (body.colour, body.shape) == ch.body and (inner.colour, inner.shape) == ch.inner
        assert (o.colour, o.shape) == ch.body
        assert np.array_equal(body.mask | inner.mask, o.mask) and not (body.mask & inner.mask).any()
        assert inner.mask.sum() >= 8 and body.mask.sum() > inner.mask.sum()


def test_objects_inside_and_apart(batch):
    _, _, scenes = batch
    for scene in scenes:
        masks = [o.mask for o in scene.objects]
        for o in scene.objects:
            up, down, left, right = S.shape_extent(o.shape, o.size)
            assert o.centre[0] - up >= 0.5 and o.centre[0] + down <= 31.5
            assert o.centre[1] - left >= 0.5 and o.centre[1] + right <= 31.5
        for i, m in enumerate(masks):
            assert m.sum() >= 20
            for other in masks[i + 1:]:
                assert not (S._grow(m, 1) & other).any()  # never touching


def test_sizes_follow_the_object_count(batch):
    _, _, scenes = batch
    for scene in scenes:
        for o in scene.objects:
            lo, hi = (S.SINGLE_CHAR_RADIUS if o.character else S.SINGLE_RADIUS) if len(scene.objects) == 1 \
                else (S.MULTI_CHAR_RADIUS if o.character else S.MULTI_RADIUS)
            assert o.size <= hi + 0.125
            assert o.size >= lo * 0.92 ** 11 - 0.125  # layouts may retry smaller
    singles = [o.size for s in scenes if len(s.objects) == 1 for o in s.objects if not o.character]
    assert min(singles) >= S.SINGLE_RADIUS[0] - 0.125


def test_captions_mention_every_object_and_style(batch):
    _, captions, scenes = batch
    tok = V.build_tokenizer()
    for caption, scene in zip(captions, scenes):
        assert caption == scene.caption
        for o in scene.objects:
            assert (o.character or f"{o.colour} {o.shape}") in caption
        if scene.background != "plain":
            assert (f"{V.STYLE_ADJECTIVES[scene.background]} background" in caption
                    or f"{V.STYLE_NOUNS[scene.background]} background" in caption)
        enc = tok.encode(caption)
        assert V.UNK_ID not in enc.ids and enc.ids.count(V.EOS_ID) == 1  # in vocab, never truncated
    assert len(set(captions)) > 250  # varied phrasings


def test_caption_forms():
    rng = np.random.default_rng(0)
    caps = {S.caption_for([("red", "circle"), "bobo"], "dots", rng) for _ in range(200)}
    assert "a red circle and bobo on a dotted background" in caps
    assert "red circle, bobo, dots background" in caps
    assert any(c.startswith("a picture of") for c in caps)
    plain = {S.caption_for([("orange", "star")], "plain", rng) for _ in range(200)}
    assert "an orange star" in plain and "an orange star on a plain background" in plain


def test_explicit_objects_and_errors():
    scene = S.render_scene(5, objects=[("red", "circle"), "kiki", ("white", "ring")], background="grid")
    assert scene.items() == ("kiki", "red circle", "white ring") and scene.background == "grid"
    with pytest.raises(ValueError, match="unknown object"):
        S.render_scene(0, objects=[("magenta", "circle")])
    with pytest.raises(ValueError, match="unknown character"):
        S.render_scene(0, objects=["zorro"])


def test_sampler_controls_the_distribution():
    three = S.SceneSampler(p_objects=(0, 0, 1), p_character=0.0, p_style=0.0, colours=("red", "blue"))
    scenes = [three.sample(s) for s in range(40)]
    assert all(len(s.objects) == 3 and s.background == "plain" for s in scenes)
    assert {o.colour for s in scenes for o in s.objects} == {"red", "blue"}
    assert not any(o.character for s in scenes for o in s.objects)
    chars = S.SceneSampler(p_objects=(1, 0, 0), p_character=1.0, p_style=1.0)
    gen = chars.scenes(seed=3)
    scenes = [next(gen) for _ in range(30)]
    assert all(s.objects[0].character and s.background != "plain" for s in scenes)


def test_display_round_trip():
    img = S.render_scene(9).image
    big = S.upscale_for_display(img)
    assert big.shape == (128, 128, 3) and np.array_equal(big[::4, ::4], img)
    assert np.array_equal(S.downscale_from_display(big), img)
    assert S.upscale_for_display(np.stack([img, img])).shape == (2, 128, 128, 3)


def test_render_speed():
    S.render_batch(1, 300)  # warm the stamp caches
    t = time.process_time()
    S.render_batch(2, 1000)
    rate = 1000 / (time.process_time() - t)
    print(f"\nrender_batch: {rate:.0f} scenes/s (CPU time)")
    assert rate >= 500  # ~2000/s on an idle core; loose bound for busy CI machines
