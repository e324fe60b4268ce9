"""Concept masks M for forget images (INPO Eq. 11) where no exact judge exists.

INPO masks its loss to the concept's region (the paper segments with SAM). Where the toy judge
cannot say where the concept is (any real model), the mask comes from:

* ``guideline``: a Detect-and-Guide guideline embedding of the concept (any concept): its
  detection map A-hat on the image, noised to ``t_fraction`` x T, thresholded at 0.5 (the
  AreaScaler's "unsafe region", DAG Alg. 1) -- the same detector the sampler uses;
* ``nudenet``: NudeNet's boxes of exposed body parts (nudity), filled;
* ``full``: the whole image (the paper's choice for styles).

An image in which the detector finds nothing keeps a whole-image mask (its concept may still be
there; INPO then erases over the whole image, as for a style) and is counted in the log.
"""

from __future__ import annotations

from ..errors import ErasekitError

MASK_SOURCES = ("auto", "full", "guideline", "nudenet")
# NudeNet 3 labels counted as nudity, as in the erasure papers' I2P evaluations
NUDITY_CLASSES = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "BUTTOCKS_EXPOSED",
                  "ANUS_EXPOSED", "MALE_BREAST_EXPOSED", "BELLY_EXPOSED", "ARMPITS_EXPOSED", "FEET_EXPOSED")
NUDITY_WORDS = {"nudity", "nude", "naked", "nsfw"}


def choose_source(source: str, target: str, guideline: str | None) -> str:
    """"auto": the guideline embedding when one is given, NudeNet for a nudity target, else the whole image."""
    if source not in MASK_SOURCES:
        raise ErasekitError(f"Unknown mask source '{source}'; choose one of {', '.join(MASK_SOURCES)}.")
    if source != "auto":
        if source == "guideline" and not guideline:
            raise ErasekitError("Masks from a guideline embedding need its file: pass --guideline <file.safetensors> "
                                "(python -m trainer guideline makes one).")
        return source
    if guideline:
        return "guideline"
    return "nudenet" if set(target.lower().replace(",", " ").split()) & NUDITY_WORDS else "full"


def boxes_to_mask(detections, height: int, width: int, classes=NUDITY_CLASSES, min_score: float = 0.5):
    """NudeNet detections (``{"class", "score", "box": [x, y, w, h]}``) -> bool ``[H, W]``, the
    union of the boxes of ``classes`` scored at least ``min_score``."""
    import numpy as np

    mask = np.zeros((height, width), bool)
    for d in detections:
        if d["class"] in classes and d["score"] >= min_score:
            x, y, w, h = (int(round(v)) for v in d["box"])
            mask[max(y, 0) : max(y + h, 0), max(x, 0) : max(x + w, 0)] = True
    return mask


def require_nudenet():
    """Check that NudeNet can run (before any image is drawn), else one sentence saying how to get it."""
    try:
        from nudenet import NudeDetector
    except ImportError:
        raise ErasekitError("Nudity masks need NudeNet: pip install nudenet (or choose another mask source).") from None
    return NudeDetector


def nudenet_masks(images, min_score: float = 0.5):
    """(masks ``[N, 1, H, W]`` float, found ``[N]`` bool) for images ``[N, 3, H, W]`` in [0, 1], by the detector
    the evaluation harness and the NudeNet nodes share (:func:`erasekit.eval.nudenet.detect`)."""
    import numpy as np
    import torch

    from ..eval.nudenet import detect

    require_nudenet()
    rgb = [img.permute(1, 2, 0).clamp(0, 1).numpy() for img in images]
    masks, found = [], []
    for im, dets in zip(rgb, detect(rgb, device="cpu")):
        m = boxes_to_mask(dets, im.shape[0], im.shape[1], min_score=min_score)
        found.append(bool(m.any()))
        masks.append(torch.from_numpy(m if m.any() else np.ones_like(m)).float()[None])
    return torch.stack(masks), torch.tensor(found)


def guideline_masks(components, embedding, latents, cond, t_fraction: float = 0.3, seed: int = 0):
    """(masks ``[N, 1, h, w]`` at latent resolution, found ``[N]``): A-hat >= 0.5 of ``embedding``
    (a :class:`~erasekit.dag.guideline.GuidelineEmbedding`) on each image's latents noised to
    ``t_fraction`` x T with its own prompt's conditioning ``cond`` (a
    :class:`~erasekit.dag.conditioning.Conditioning`: SDXL's UNet also needs the pooled embedding and size ids)."""
    import torch

    from ..dag.detect import gated_normalise
    from ..dag.guideline import cache_queries, detection_from_queries

    embedding.check(components.architecture, "the guideline embedding for masks")
    unet = components.unet
    device = unet.device
    t = int(round(t_fraction * components.scheduler.config.num_train_timesteps))
    hw = tuple(latents.shape[-2:])
    masks, found = [], []
    for s in range(0, len(latents), 8):
        cache, layers = cache_queries(unet, components.scheduler, latents[s : s + 8].to(device, unet.dtype),
                                      cond.rows(slice(s, s + 8)).to(device, unet.dtype), [t], seed + s)
        for i in range(len(latents[s : s + 8])):
            with torch.no_grad():
                raw = detection_from_queries(cache[(i, t)], layers, embedding.sink, embedding.tokens, hw, embedding.contrast)
            region = gated_normalise(raw, *embedding.gate_floor(t))[0] >= 0.5
            found.append(bool(region.any()))
            masks.append((region if region.any() else torch.ones_like(region)).float().cpu()[None])
    return torch.stack(masks), torch.tensor(found)
