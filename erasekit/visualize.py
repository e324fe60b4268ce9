"""Pictures people look at: heatmaps over images (pure torch, no plotting library)."""

from __future__ import annotations


def colormap(heat):
    """Map ``[..., H, W]`` values in [0, 1] to RGB ``[..., H, W, 3]`` (blue -> green -> red)."""
    import torch

    x = heat.clamp(0, 1)[..., None]
    centres = torch.tensor([0.75, 0.5, 0.25], dtype=x.dtype, device=x.device)  # R, G, B peaks
    return (1.5 - (4 * (x - centres)).abs()).clamp(0, 1)


def heat_overlay(image, heat, alpha: float = 0.5):
    """Blend a heatmap over images: ``image`` [B, H, W, 3] in [0, 1], ``heat`` [B, H, W]."""
    import torch.nn.functional as F

    if heat.shape[-2:] != image.shape[1:3]:
        heat = F.interpolate(heat[:, None].float(), size=image.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    return ((1 - alpha) * image + alpha * colormap(heat).to(image.dtype)).clamp(0, 1)
