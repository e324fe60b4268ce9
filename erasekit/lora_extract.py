"""Extract a LoRA from full weights by truncated SVD of the weight difference.

For fine-tunes that were not trained as LoRAs: ESD/UCE-style partial diffusers-keyed attention
weights, a full NCD or ResAlign UNet, a merged checkpoint. Follows sd-scripts'
``networks/extract_lora_from_models.py`` (diff = W_tuned - W_orig; up = U_r diag(S_r), down = Vh_r)
and ``resize_lora.py`` (rank by kept Frobenius energy or singular-value ratio), with the outlier
clamp done per matrix, and reports the reconstruction error of every layer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .errors import ArchitectureError, ErasekitError
from .lora_io import Lora, LoraWeights, canonical_module


class Extraction(NamedTuple):
    lora: Lora
    errors: dict  # {module: ||dW - up@down||_F / ||dW||_F}
    max_error: float
    skipped: dict  # {parameter: relative change} that a LoRA cannot hold (biases, norms, embeddings)


def extract_lora(original, tuned, rank: int | None = None, sv_fro: float | None = None, sv_ratio: float | None = None,
                 clamp_quantile: float | None = None, component: str = "unet", min_change: float = 1e-7) -> Extraction:
    """A LoRA approximating ``tuned - original`` per layer by truncated SVD.

    Args:
        original, tuned: modules or state dicts with diffusers keys; ``tuned`` may hold only
            the changed weights (ESD/UCE-style partial dicts).
        rank: fixed rank per layer, or the cap when ``sv_fro`` / ``sv_ratio`` choose it.
        sv_fro: keep the fewest singular values that retain this fraction of ||dW||_F (0..1].
        sv_ratio: keep singular values within this factor of the largest (sd-scripts resize_lora).
        clamp_quantile: clip each of up and down *separately* at this quantile of its own |values|
            (sd-scripts clips both with one quantile of the two together, which cuts up hard).
        min_change: layers with ||dW|| <= min_change * ||W|| are treated as unchanged.
    Conv kernels [out, in, kh, kw] are flattened to [out, in*kh*kw]; down becomes the kh x kw conv.
    Alpha = rank, so the file applies exactly up @ down at strength 1. A weight of another shape, or
    with a NaN or infinite value, is refused with one sentence naming it.
    """
    import torch

    if rank is None and sv_fro is None and sv_ratio is None:
        raise ValueError("give a rank, sv_fro or sv_ratio")
    orig = original if isinstance(original, dict) else original.state_dict()
    new = tuned if isinstance(tuned, dict) else tuned.state_dict()
    lora, errors, skipped = {}, {}, {}
    for key, w1 in new.items():
        if key not in orig:
            raise ArchitectureError(f"The tuned weight '{key}' is not in the original model; compare like with like.")
        w0 = orig[key].float().to(w1.device)  # e.g. base weights kept on the CPU, trained ones on the GPU
        if w0.shape != w1.shape:
            raise ArchitectureError(f"The tuned weight '{key}' is {list(w1.shape)}, the original {list(w0.shape)}; "
                                    "compare like with like.")
        diff = w1.float() - w0
        if not bool(diff.isfinite().all()):
            raise ErasekitError(f"The weight '{key}' has NaN or infinite values (tuned or original); a LoRA of it "
                                "would be too: the fine-tune diverged or its file is damaged.")
        change = diff.norm().item()
        if change <= min_change * max(w0.norm().item(), 1e-12):
            continue
        # a LoRA holds Linear / Conv2d changes; text encoders' token and position embeddings are 2-D
        # too, but no loader (ComfyUI, A1111, diffusers) applies a LoRA to them
        if not key.endswith(".weight") or diff.dim() not in (2, 4) or key.endswith("_embedding.weight"):
            skipped[key] = change / max(w0.norm().item(), 1e-12)
            continue
        mat = diff.flatten(1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = len(s) if rank is None else min(rank, len(s))
        if sv_fro is not None:
            kept = (s.square().cumsum(0) / s.square().sum()).sqrt()
            r = min(r, int((kept < sv_fro - 1e-7).sum()) + 1)
        if sv_ratio is not None:
            r = min(r, max(1, int((s >= s[0] / sv_ratio).sum())))
        up, down = u[:, :r] * s[:r], vh[:r]
        if clamp_quantile is not None:
            up, down = (_clamp(t, clamp_quantile) for t in (up, down))
        module = canonical_module(component, key[: -len(".weight")])
        errors[module] = ((mat - up @ down).norm() / mat.norm()).item()
        if diff.dim() == 4:
            down, up = down.reshape(r, *diff.shape[1:]), up.reshape(*up.shape, 1, 1)
        lora[module] = LoraWeights(down.contiguous(), up.contiguous(), float(r))
    return Extraction(lora, errors, max(errors.values(), default=0.0), skipped)


def _clamp(t, q: float):
    flat = t.abs().flatten()
    hi = flat.kthvalue(max(1, min(flat.numel(), math.ceil(q * flat.numel())))).values
    return t.clamp(-hi, hi)
