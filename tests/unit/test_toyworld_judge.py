"""Toy-world judge: accuracy on held-out scenes (clean and perturbed), inputs, helpers, speed.

Seeds here were never used while developing the judge."""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from erasekit.toyworld import judge as J
from erasekit.toyworld import scenes as S
from erasekit.toyworld import vocab as V

HELD_OUT_SEED = 90_210_317


def _accuracy(scenes, judgements) -> dict[str, float]:
    ok, total = Counter(), Counter()
    for scene, j in zip(scenes, judgements):
        good = J.exact_match(scene, j)
        groups = ["all", "single" if len(scene.objects) == 1 else "multi"]
        if any(o.character for o in scene.objects):
            groups.append("character")
        for g in groups:
            ok[g] += good
            total[g] += 1
        ok["style"] += scene.background == j.background
        total["style"] += 1
    return {g: ok[g] / total[g] for g in total}


def _perturb(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a generated image gets wrong: colour jitter (global and per object) and pixel noise."""
    im = image.astype(np.float64) + rng.uniform(-12, 12, 3) + rng.normal(0, 10, image.shape)
    return np.clip(np.rint(im), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def held_out():
    _, _, scenes = S.render_batch(HELD_OUT_SEED, 600)
    return scenes


def test_accuracy_on_held_out_scenes(held_out):
    t = time.process_time()
    judgements = [J.judge(s.image) for s in held_out]
    rate = len(held_out) / (time.process_time() - t)
    acc = _accuracy(held_out, judgements)
    print(f"\njudge (clean, n={len(held_out)}): " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
          + f"; {rate:.0f} judgements/s (CPU time)")
    assert acc["all"] >= 0.98
    assert min(acc["single"], acc["multi"], acc["character"], acc["style"]) >= 0.95
    assert rate >= 150  # ~400/s on a busy core; loose bound for busy CI machines


def test_accuracy_under_noise_and_jitter(held_out):
    rng = np.random.default_rng(HELD_OUT_SEED + 1)
    scenes = held_out[:500]
    images = []
    for s in scenes:
        im = s.image.astype(np.float64)
        for o in s.objects:  # each object slightly off its palette colour
            im[o.mask] += rng.uniform(-10, 10, 3)
        images.append(_perturb(np.clip(im, 0, 255).astype(np.uint8), rng))
    acc = _accuracy(scenes, [J.judge(im) for im in images])
    print("\njudge (noise sigma 10/255 + jitter): " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    assert acc["all"] >= 0.95


def test_soft_images_and_faint_patterns(held_out):
    """Generated images are blurry; a pattern at under MIN_CONTRAST of its rendered contrast is plain."""
    scenes = held_out[:200]
    blurred = [ndimage.gaussian_filter(s.image.astype(np.float64), (0.6, 0.6, 0)) for s in scenes]
    assert _accuracy(scenes, [J.judge(np.rint(b).astype(np.uint8)) for b in blurred])["all"] >= 0.95
    scene = S.render_scene(HELD_OUT_SEED + 5, objects=[("green", "ring")], background="stripes")
    base = np.float64(V.BACKGROUND_BASE)
    bare_pattern = (scene.image == V.BACKGROUND_PATTERN).all(-1)  # pattern pixels no object touches
    for contrast, style in [(0.15, "plain"), (0.5, "stripes")]:
        faint = base + contrast * (np.float64(V.BACKGROUND_PATTERN) - base)
        im = np.where(bare_pattern[..., None], faint, scene.image)
        assert J.judge(np.rint(im).astype(np.uint8)).background == style


def test_masks_match_ground_truth(held_out):
    ious = []
    for s in held_out[:100]:
        j = J.judge(s.image)
        for o in s.objects:
            best = max((np.sum(d.mask & o.mask) / np.sum(d.mask | o.mask) for d in j.objects), default=0.0)
            ious.append(best)
    assert np.mean(ious) >= 0.97 and min(ious) >= 0.8


def test_display_size_and_float_inputs_agree():
    scene = S.render_scene(HELD_OUT_SEED + 2, n_objects=3, background="stripes")
    base = J.judge(scene.image)
    assert J.exact_match(scene, base)
    for im in (S.upscale_for_display(scene.image), scene.image / 255.0,
               S.upscale_for_display(scene.image).astype(np.float32) / 255):
        j = J.judge(im)
        assert j.items() == base.items() and j.background == base.background


def test_has_and_count():
    scene = S.render_scene(HELD_OUT_SEED + 3, objects=[("red", "circle"), ("red", "star"), "bobo"], background="dots")
    j = J.judge(scene.image)
    assert j.items() == ("bobo", "red circle", "red star") and j.background == "dots"
    assert j.has("red circle") and j.has("bobo") and j.has("dotted background") and j.has("red")
    assert not j.has("blue circle") and not j.has("kiki") and not j.has("red square")  # bobo is a unit
    assert j.has(V.parse_concept("star"))
    assert j.count(colour="red") == 2 and j.count(shape="circle") == 1 and j.count() == 2
    assert j.count(character="bobo") == 1


def test_empty_image_and_stray_blobs():
    empty = S.render_scene(1, objects=[], background="grid")
    j = J.judge(empty.image)
    assert j.objects == [] and j.background == "grid"
    scene = S.render_scene(HELD_OUT_SEED + 4, objects=[("blue", "triangle")])
    im = scene.image.copy()
    free = ~S._grow(scene.objects[0].mask, 3)
    ys, xs = np.nonzero(free[:-2, :-2] & free[2:, 2:])
    for y, x in list(zip(ys, xs))[::97][:3]:  # three 2x2 specks of palette colour
        im[y:y + 2, x:x + 2] = V.COLOURS["orange"]
    assert J.judge(im).items() == ("blue triangle",)


def test_bad_inputs():
    with pytest.raises(ValueError):
        J.judge(np.zeros((30, 30, 3), np.uint8))
    with pytest.raises(ValueError):
        J.judge(np.zeros((32, 32), np.uint8))


def _touching(a, b, r=6.0):
    """Objects a and b on a plain background, b moved in from the right until the two form one
    8-connected group: what a generated image does and the renderer never does."""
    for dx in np.arange(2.5 * r, r, -0.25):
        img = S._background_image("plain", (0, 0), True, S.SIZE)[1].copy()
        objs = S._draw(img, [(a, r, (13.0, 8.0)), (b, r, (15.0, 8.0 + dx))], S.SIZE)
        if ndimage.label(objs[0].mask | objs[1].mask, np.ones((3, 3), bool))[1] == 1:
            return np.rint(img).astype(np.uint8), objs
    raise AssertionError("never touched")


@pytest.mark.parametrize("a,b", [(("red", "star"), ("white", "star")), (("green", "triangle"), ("red", "square")),
                                 (("orange", "circle"), ("white", "star")), (("blue", "ring"), ("purple", "circle"))])
def test_touching_objects_of_two_colours_are_two_objects(a, b):
    image, objs = _touching(a, b)
    assert (objs[0].mask & objs[1].mask).sum() <= 2  # touching, hardly overlapping
    assert J.judge(image).items() == tuple(sorted([" ".join(a), " ".join(b)]))


def test_a_blob_whose_colour_changes_halfway_stays_one_object():
    """Two colours in one shape (a square white on the left, yellow on the right) are no two shapes."""
    img = S._background_image("plain", (0, 0), True, S.SIZE)[1].copy()
    (sq,) = S._draw(img, [(("white", "square"), 8.0, (16.0, 16.0))], S.SIZE)
    right = sq.mask & (np.arange(S.SIZE)[None, :] >= 16)
    img[right] = V.COLOURS["yellow"]
    j = J.judge(np.rint(img).astype(np.uint8))
    assert len(j.objects) == 1 and j.objects[0].shape == "square"


def _touching_at(a, b, ra, rb, angle):
    """a and b (radii ra, rb) centred on the image, b approaching along ``angle`` until the two
    masks, and the judge's foreground, form one 8-connected group; None if they never do."""
    centre, d = np.array([16.0, 16.0]), np.array([np.sin(angle), np.cos(angle)])
    for dist in np.arange(1.5 * (ra + rb), 0.5 * (ra + rb), -0.25):
        img = S._background_image("plain", (0, 0), True, S.SIZE)[1].copy()
        objs = S._draw(img, [(a, ra, tuple(centre - d * dist / 2)), (b, rb, tuple(centre + d * dist / 2))], S.SIZE)
        image = np.rint(img).astype(np.uint8)
        if all(ndimage.label(m, np.ones((3, 3), bool))[1] == 1
               for m in (objs[0].mask | objs[1].mask, J.classify_pixels(J.to_judge_input(image)) >= 0)):
            return image, objs
    return None


@pytest.mark.parametrize("a,b", [("ring", "ring"), ("star", "circle"), ("triangle", "square"), ("circle", "circle")])
def test_touching_objects_of_one_colour_are_two_objects(a, b):
    image, objs = _touching_at(("yellow", a), ("yellow", b), 6.0, 6.0, 0.0)
    assert (objs[0].mask & objs[1].mask).sum() <= 2
    assert J.judge(image).items() == tuple(sorted([f"yellow {a}", f"yellow {b}"]))
    assert J.judge(image, split=False).items() != J.judge(image).items()  # the old judge read one object


def test_touching_pairs_of_one_colour_held_out():
    """Every pair of shapes, random sizes and directions: the judge reads both objects in >= 85%
    (measured 0.92 when written; two squares meeting edge to edge make a rectangle, no neck)."""
    rng = np.random.default_rng(HELD_OUT_SEED + 11)
    colours = list(V.COLOURS)
    ok = n = 0
    for sa, sb in [(x, y) for k, x in enumerate(V.SHAPES) for y in V.SHAPES[k:]]:
        for _ in range(4):
            colour = colours[int(rng.integers(len(colours)))]
            made = _touching_at((colour, sa), (colour, sb), *rng.uniform(*S.MULTI_RADIUS, 2).round(2),
                                rng.uniform(0, 2 * np.pi))
            if made is not None:
                n += 1
                ok += J.judge(made[0]).items() == tuple(sorted([f"{colour} {sa}", f"{colour} {sb}"]))
    assert n >= 50 and ok / n >= 0.85, (ok, n)


def test_one_object_is_never_cut_in_two():
    """Cutting at necks leaves single rendered objects whole: every shape, radius 4-10 px."""
    rng = np.random.default_rng(HELD_OUT_SEED + 12)
    for shape in V.SHAPES:
        for r in np.arange(4.0, 10.25, 0.5):
            img = S._background_image("plain", (0, 0), True, S.SIZE)[1].copy()
            S._draw(img, [(("green", shape), r, tuple(rng.uniform(12, 20, 2)))], S.SIZE)
            assert J.judge(np.rint(img).astype(np.uint8)).items() == (f"green {shape}",), (shape, r)
