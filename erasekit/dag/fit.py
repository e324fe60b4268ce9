"""Learn a guideline embedding from a forget set (images of the concept, with masks) and a
preserve set (images without it): DAG Sec. 3.1 on the same data the erasure trainer builds.

The data comes from :func:`erasekit.erase.data.build_erase_data` (sized by
:func:`erasekit.erase.data.guideline_data_config`): on the toy model, images the
model draws, masked exactly by the judge; on other models, the user's folder of ``name.png`` +
``name_mask.png``. Safe images get zero masks (Eq. 2). The paper uses five unsafe and three safe
images; the toy defaults are larger (40 and 30, of which the toy world has 11 neighbouring
concepts to show): they still train in seconds, and on the toy model they lift the detection
IoU from 0.29 to 0.43 and the share of red circles found by step 6 of 25 from 0.25 to 0.54
(an offline sweep over 140 held-out images; the README's DAG section has the bench figures).
"""

from __future__ import annotations

import time

from ..errors import ErasekitError

GUIDELINE_IMAGES, GUIDELINE_SAFE_IMAGES = 40, 30  # the defaults (see above): images with / without the concept


def fit_guideline(components, data, concept: str, *, init_phrase: str | None = None, steps: int | None = None,
                  contrast: list | None = None, seed: int = 0, callback=None, log=print):
    """A :class:`~erasekit.dag.guideline.GuidelineEmbedding` for ``concept``.

    Args:
        components: :class:`erasekit.models.Components` (one text encoder: SD1.x, SD2.x, toy).
        data: :class:`erasekit.erase.data.EraseData` (forget set with masks; preserve set optional).
        init_phrase: the words c* starts from (default: the concept).
        steps: default 100 x the number of unsafe images (Table 4).
        contrast: phrases of concepts that are not this one, whose encoded words compete with the
            guideline tokens for each pixel's attention (``erasekit/dag/detect.py``); default: the
            concepts of the safe images (``data.preserved``); ``[]``: none (the paper).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .conditioning import Conditioning
    from .guideline import GuidelineEmbedding, encode_phrase_for, optimize_guideline

    forget, preserve = data.forget, data.preserve
    if forget is None or len(forget) == 0:
        raise ErasekitError(f"No images of '{concept}' to learn from: the forget set is empty.")
    sets = [forget] + ([preserve] if preserve is not None and len(preserve) else [])
    hw = tuple(forget.latents.shape[-2:])
    masks = forget.masks if forget.masks is not None else torch.ones(len(forget), 1, *hw)
    masks = F.interpolate(masks.float(), size=hw, mode="area")[:, 0]
    masks = torch.cat([masks] + [torch.zeros(len(s), *hw) for s in sets[1:]])
    unsafe = [True] * len(forget) + [False] * sum(len(s) for s in sets[1:])
    unet = components.unet
    device = unet.device
    # the UNet's text inputs as the data holds them (SDXL: with its pooled embedding and size ids)
    conds = Conditioning.cat([s.conditioning() for s in sets]).to(device)
    sink, init = encode_phrase_for(components, init_phrase or concept)
    phrases = [p for p in dict.fromkeys(data.preserved if contrast is None else contrast) if p and p != concept]
    contrast_states = torch.cat([encode_phrase_for(components, p)[1] for p in phrases]).to(device) if phrases else None
    t0 = time.time()
    fit = optimize_guideline(unet, components.scheduler, torch.cat([s.latents for s in sets]).to(device), conds,
                             masks.to(device), unsafe, sink=sink, init_tokens=init, steps=steps, seed=seed,
                             contrast=contrast_states, callback=callback)
    hist = fit.history
    info = {"n_unsafe": int(sum(unsafe)), "n_safe": int(len(unsafe) - sum(unsafe)), "steps": len(hist),
            "loss_first": round(hist[0], 4), "loss_last": round(float(np.mean(hist[-10:])), 4),
            "seconds": round(time.time() - t0, 1), **fit.gate_stats, "floor": round(fit.floor, 4),
            "contrast_tokens": 0 if contrast_states is None else len(contrast_states)}
    log(f"guideline for '{concept}': {info}")
    arch = components.architecture.name if components.architecture is not None else "unknown"
    return GuidelineEmbedding(fit.tokens.cpu(), sink.cpu(), concept, arch, init_phrase or concept, info=info,
                              gate=fit.gate, floor=fit.floor, schedule=fit.schedule,
                              contrast=None if contrast_states is None else contrast_states.cpu(), contrast_phrases=phrases)
