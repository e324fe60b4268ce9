"""Guideline detection (DAG Sec. 3.1): where in the image is the unsafe concept?

A guideline embedding holds K token states c* in the text encoder's output space (the space a
cross-attention layer's ``to_k`` reads). At a chosen layer, the image queries Q attend over
keys [k_sink; to_k(contrast); to_k(c*)]. The *sink* is the state of the start token, identical
for every prompt in a causal CLIP encoder, so it carries nothing about any concept: it gives a
pixel somewhere to put its attention when the concept is not there. The CAM of a pixel is the
probability mass its queries give the K guideline keys (softmax over all keys, averaged over
heads). This is OVAM's attribution map with one choice the papers leave open made explicit:
with a lone guideline token a softmax over it alone is constant 1, and min-max normalisation
would always "find" something; against the sink the map is an absolute probability, so
"nothing detected" is a real outcome (and lazy DAG can skip the extra pass).

Beyond the paper, *contrast* keys: the encoded words of concepts that are not the target (by
default those of the guideline's safe training images: "orange circle", "red square" for "red
circle"). A pixel of an orange circle then puts its attention on "orange circle" rather than on
the guideline, which alone would be its nearest match. The tokens are learned with the contrast
keys in place, so they only need to beat them where the target is. On the toy model this lifts
the image-level AUROC and finds the target earlier in sampling (the README's DAG section).

The raw map A is the mean over the chosen layers (the two coarsest levels) after bilinear
upsampling. A-hat, what the guidance thresholds (0.5, 0.01) are applied to, is A min-max
normalised per image to [0, 1] (the paper), but only for images whose peak of A reaches the
embedding's *gate*; other images get A-hat = 0. Min-max alone always "finds" something, even in
a benign image; the gate restores "nothing here". Pixels at or below the embedding's *floor*
(its background level) are 0 in A-hat: where the background's CAM is not near its minimum (the
toy model's), min-max leaves nearly every pixel above the paper's 0.01 edit threshold. Both the
gate and the floor are calibrated on the embedding's training images (see
:func:`gated_normalise`); the gate rises late in sampling where the embedding's per-timestep
schedule says so (a formed neighbour's CAM can pass the fixed gate there).
Several concepts combine by a pixel-wise max of their A-hat.
"""

from __future__ import annotations


def guideline_keys(to_k, sink, tokens, contrast=None, like=None):
    """Keys ``[1 + M + K, inner]`` of [sink; contrast; tokens] through a layer's ``to_k`` (a Linear).

    ``sink``: ``[D]``; ``tokens``: ``[K, D]``; ``contrast``: ``[M, D]`` or None. The states go in on
    the device and dtype of ``like`` (the layer's input; ComfyUI's layers cast their weights to it,
    which may be stored elsewhere: low-VRAM offload, fp8), else of ``to_k``'s weight."""
    import torch

    parts = [sink[None]] + ([contrast] if contrast is not None and len(contrast) else []) + [tokens]
    ref = to_k.weight if like is None else like
    return to_k(torch.cat([p.to(device=ref.device, dtype=ref.dtype) for p in parts], 0))


def guideline_cam(q, keys, heads: int, n_tokens: int):
    """Per-pixel attention mass on the guideline tokens.

    Args:
        q: ``[B, N, heads * d]`` projected image queries of one cross-attention layer.
        keys: ``[1 + M + K, heads * d]`` from :func:`guideline_keys` (the K guideline tokens last).
        n_tokens: K.
    Returns:
        ``[B, N]`` in [0, 1]: softmax over all keys, the last ``n_tokens`` summed, heads averaged.
    """
    b, n, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2).float()  # [B, h, N, d]
    kh = keys.reshape(-1, heads, d).transpose(0, 1).float()  # [h, 1+M+K, d]
    probs = (qh @ kh.transpose(-1, -2) * d**-0.5).softmax(-1)  # [B, h, N, 1+M+K]
    return probs[..., -n_tokens:].sum(-1).mean(1)


def to_grid(cam, latent_hw):
    """``[B, N]`` -> ``[B, h, w]`` for a layer of the UNet sampling a latent ``(H, W)``."""
    from ..attention import grid_shape

    _, h, w = grid_shape(latent_hw, cam.shape[1])
    return cam.reshape(cam.shape[0], h, w)


def detection_map(layer_maps, size):
    """A-hat ``[B, H, W]``: mean over layers of the ``[B, h, w]`` maps upsampled to ``size``."""
    import torch.nn.functional as F

    ups = [F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0] for m in layer_maps]
    return sum(ups) / len(ups)


def gated_normalise(a, gate: float, floor: float | None = None, min_range: float = 1e-3, peak_ref=None):
    """A-hat ``[B, H, W]`` from a raw map A.

    Per image: nothing detected (all zeros) when max(A) < ``gate`` (a float, or ``[B]``); otherwise the paper's
    min-max normalisation, (A - min A) / (max A - min A), with the pixels where A <= ``floor``
    set to 0. The floor is the level the guideline gives background pixels
    (:func:`erasekit.dag.guideline.calibrate_gate`). It matters where the background's CAM is
    not near its minimum: min-max alone then puts nearly every pixel above the paper's 0.01 edit
    threshold and the AreaScaler's 80% rule switches DAG off. It leaves the unsafe region (A-hat
    >= 0.5, the half-way level between the image's minimum and its peak) as the paper has it;
    where the background sits at the minimum (SD's CAMs) nothing changes. ``floor=None``: the
    paper's map. A map flatter than ``min_range`` says nothing about *where*: zeros too.

    ``peak_ref`` (a float or ``[B]``, 0 = none): the top of the normalisation is max(max A,
    ``peak_ref``), so where the image's peak has fallen below it the map is not stretched back to 1
    (hysteresis, :func:`detect_concepts`).
    """
    import torch

    flat = a.flatten(1)
    hi = flat.max(1).values[:, None, None]
    lo = flat.min(1).values[:, None, None]
    gate = torch.as_tensor(gate, dtype=a.dtype, device=a.device).reshape(-1, 1, 1)  # a float or one per image
    top = hi
    if peak_ref is not None:
        top = torch.maximum(hi, torch.as_tensor(peak_ref, dtype=a.dtype, device=a.device).reshape(-1, 1, 1))
    norm = ((a - lo) / (top - lo).clamp_min(min_range)).clamp(0.0, 1.0)
    if floor is not None:
        norm = torch.where(a > float(floor), norm, torch.zeros_like(norm))
    return torch.where((hi >= gate) & (hi - lo >= min_range), norm, torch.zeros_like(a))


def detect_concepts(per_concept_layer_maps, embeddings, size, timestep: float | None = None, held=None):
    """Multi-concept detection: (A-hat ``[B, H, W]``, scores ``[B]``).

    ``per_concept_layer_maps``: for each embedding, its ``[B, h, w]`` layer maps. Each concept's raw
    map A is gated and normalised with its own gate and floor (at ``timestep`` when the embedding
    has a per-timestep schedule); A-hat is their pixel-wise max. The score is the largest
    peak(A) / gate over the concepts (>= 1: detected).

    ``held`` ``[B]`` bool: images where the concept was detected at an earlier step. Beyond the
    paper, their gate is the floor (hysteresis, as in Canny's edge tracking): the edit weakens the
    concept's CAM, and with the entry gate the guidance would stop as soon as it starts working and
    let the model draw the object back. The entry gate stays high, so benign images stay untouched.
    A held image's map is scaled against the entry gate while its peak is below it (``peak_ref``):
    once the object fades, min-max would stretch whatever else is left, a neighbouring object's
    weaker response, up to 1 and edit that instead (toy model: preservation 0.89 -> 0.91, erase
    unchanged; README's DAG section)."""
    import torch

    maps, scores = [], []
    for emb, layer_maps in zip(embeddings, per_concept_layer_maps):
        raw = detection_map(list(layer_maps), size)
        gate, floor = emb.gate_floor(timestep)
        scores.append(raw.flatten(1).amax(1) / gate)
        peak_ref = None
        if held is not None and floor is not None:
            peak_ref = torch.where(held, float(gate), 0.0)  # per image
            gate = torch.where(held, float(floor), float(gate))
        maps.append(gated_normalise(raw, gate, floor, peak_ref=peak_ref))
    return combine_concepts(maps), torch.stack(scores).amax(0)


def update_held(held, scores):
    """``held`` after this step: images detected now (score >= 1) or before. ``held`` may be None."""
    now = scores >= 1.0
    return now if held is None else held | now


class Detector:
    """:func:`detect_concepts` over the steps of one sampling, carrying the hysteresis state.

    The diffusers sampler and the ComfyUI patch both call it once per step; ``reset()`` before a
    new sampling. ``hold=False``: the paper's per-step detection (no memory)."""

    def __init__(self, embeddings, hold: bool = True):
        self.embeddings = list(embeddings)
        self.hold = hold
        self.held = None  # [B] bool: images detected at an earlier step

    def reset(self):
        self.held = None

    def __call__(self, per_concept_layer_maps, size, timestep: float | None = None):
        """(A-hat ``[B, H, W]``, scores ``[B]``) of this step; see :func:`detect_concepts`."""
        batch = len(per_concept_layer_maps[0][0])
        held = self.held if self.hold and self.held is not None and len(self.held) == batch else None
        a_hat, scores = detect_concepts(per_concept_layer_maps, self.embeddings, size, timestep, held)
        self.held = update_held(held, scores)
        return a_hat, scores


def combine_concepts(maps):
    """Multi-concept A-hat: pixel-wise max over the concepts' maps."""
    import torch

    return torch.stack(list(maps)).amax(0)
