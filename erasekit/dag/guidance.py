"""Safe self-regulation: DAG's adaptive, region-limited safety guidance and its peers.

All functions work in *denoised* (x0) space, which is what ComfyUI's post-CFG hook and any
sampler expose. A noise-space correction maps to x0 space linearly (x0 = x - sigma * eps), so
DAG's Eq. 4 in noise space,

    eps = (1 - s_g) eps_u + s_g (eps_p - S * M * (eps_cs - eps_u)),                     (Eq. 4)

(the safety direction written as SLD/SEGA write it: away from the safety concept c_s, relative
to the unconditional prediction) is, in x0 space,

    x0 = x0_cfg - s_g * S * M * (x0_cs - x0_u),        x0_cfg = x0_u + s_g (x0_p - x0_u).

With S = 0 this is plain CFG, bit for bit (the correction is not even computed).
Shapes: predictions ``[B, C, H, W]`` (latent), detection maps ``[B, h, w]`` in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# ----------------------------------------------------------------------------- DAG scalers (App. A.2)


def magnitude_scaler(a_hat, tau_low: float = 0.01, max_scale: float = 5.0):
    """MagnitudeScaler T (Eq. 5): confident pixels get strong edits.

    The paper prints ``max(A / tau, 5)``; with its stated range 1 <= T <= 5 this is a clamp:
    T(a) = clamp(a / tau_low, 1, 5) on pixels with a >= tau_low, 0 elsewhere.
    """
    import torch

    t = (a_hat / tau_low).clamp(1.0, max_scale)
    return torch.where(a_hat >= tau_low, t, torch.zeros_like(t))


def area_scaler(a_hat, tau_high: float = 0.5, tau_low: float = 0.01, max_edit_fraction: float = 0.8):
    """Highlighted Area Scaler (Alg. 1), per image.

    Each connected region of A >= tau_high (``scipy.ndimage.label``) is an object i; its pixels
    get s_bar * Area_i with s_bar = 5 / (H W), i.e. 5 x the fraction of the image it covers
    (larger objects need stronger edits). The rest of the editing region (A >= tau_low) takes
    the value of its nearest object ("SpatialInterpolate"; here a nearest-object fill via a
    distance transform). An editing region covering >= 80% of the image means no object has
    formed yet (ambiguous early mode): S = 0.

    Args:
        a_hat: ``[B, h, w]`` detection maps in [0, 1] (torch).
    Returns:
        ``[B, h, w]`` scale map S_area (torch, same device/dtype).
    """
    import torch
    from scipy import ndimage

    a = a_hat.detach().float().cpu().numpy()
    out = np.zeros_like(a)
    s_bar = 5.0 / (a.shape[1] * a.shape[2])
    for b in range(a.shape[0]):
        edit = a[b] >= tau_low
        if edit.mean() >= max_edit_fraction:
            continue
        labels, n = ndimage.label(a[b] >= tau_high)
        if n == 0:
            continue
        areas = ndimage.sum_labels(np.ones_like(a[b]), labels, index=np.arange(1, n + 1))
        s_unsafe = np.concatenate([[0.0], s_bar * areas])[labels]
        _, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        s_edit = s_unsafe[iy, ix] * edit
        out[b] = np.maximum(s_unsafe, s_edit)
    return torch.from_numpy(out).to(a_hat.device, a_hat.dtype)


def dag_scale_map(a_hat, tau_high: float = 0.5, tau_low: float = 0.01, max_scale: float = 5.0):
    """S = (s_bar Area_0.5(A)) (.) T_0.01(A)   (Table 1, DAG column)."""
    return area_scaler(a_hat, tau_high, tau_low) * magnitude_scaler(a_hat, tau_low, max_scale)


def top_p_mask(direction, threshold: float = 0.9):
    """SEGA's mask: keep the elements of ``direction`` whose magnitude is in the top
    ``1 - threshold`` of their (image, channel) (SEGA's edit_threshold; 0 keeps all)."""
    import torch

    if threshold <= 0:
        return torch.ones_like(direction, dtype=torch.bool)
    mag = direction.abs().flatten(2).float()
    q = torch.quantile(mag, threshold, dim=2, keepdim=True)
    return (mag >= q).view_as(direction)


def upsample_map(m, size):
    """``[B, h, w]`` -> ``[B, 1, H, W]`` (bilinear), for combining with latent predictions."""
    import torch.nn.functional as F

    return F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)


@dataclass
class DagSettings:
    """DAG's defaults (Table 1, Alg. 1, App. A.2)."""

    tau_high: float = 0.5  # unsafe region threshold (AreaScaler)
    tau_low: float = 0.01  # editing region threshold (EditMask, MagnitudeScaler)
    max_scale: float = 5.0  # MagnitudeScaler range [1, 5]
    top_p: float = 0.0  # SEGA-style top-p mask on the safety direction; 0 = whole detected region
    warmup_fraction: float = 0.1  # paper: 5 of 50 steps
    strength: float = 1.0  # multiplies S (1 = the paper)
    hold: bool = True  # beyond the paper: once detected, an image is gated at the floor (detect_concepts)


def detected_rows(a_hat, settings: DagSettings) -> list[int]:
    """Indices of the images with a detected object: a region A >= tau_high while the editing
    region stays below 80% of the image. For the others S = 0: no extra pass is needed."""
    s = area_scaler(a_hat, settings.tau_high, settings.tau_low)
    return [int(i) for i in (s.flatten(1) > 0).any(1).nonzero().flatten()]


def dag_combine(x0_cfg, x0_u, x0_cs, a_hat, cond_scale: float, settings: DagSettings):
    """Eq. 4 in x0 space: x0_cfg - s_g * S * M * (x0_cs - x0_u).

    ``a_hat`` is the detection map at any resolution; S and M are upsampled to the latent.
    M = I[A >= tau_low] (.) top-p mask of the safety direction (Table 1).
    """
    direction = x0_cs - x0_u
    size = x0_cfg.shape[-2:]
    s = upsample_map(dag_scale_map(a_hat, settings.tau_high, settings.tau_low, settings.max_scale), size)
    m = (upsample_map(a_hat, size) >= settings.tau_low) & top_p_mask(direction, settings.top_p)
    return x0_cfg - cond_scale * settings.strength * s.to(x0_cfg.dtype) * m.to(x0_cfg.dtype) * direction


# ----------------------------------------------------------------------------- peers: SLD and SEGA


@dataclass
class SldSettings:
    """Safe Latent Diffusion (Schramowski et al. 2023), presets as in its paper / diffusers."""

    warmup_steps: int
    guidance_scale: float
    threshold: float
    momentum_scale: float
    mom_beta: float

    @classmethod
    def preset(cls, name: str) -> "SldSettings":
        presets = {
            "weak": cls(15, 20, 0.0, 0.0, 0.0),
            "medium": cls(10, 1000, 0.01, 0.3, 0.4),
            "strong": cls(7, 2000, 0.025, 0.5, 0.7),
            "max": cls(0, 5000, 1.0, 0.5, 0.7),
        }
        if name not in presets:
            raise ValueError(f"unknown SLD preset '{name}'; choose one of {', '.join(presets)}")
        return presets[name]


class SldState:
    """SLD's momentum, carried across the steps of one sampling."""

    def __init__(self):
        self.momentum = None


def sld_combine(x0_u, x0_p, x0_cs, sigma, cond_scale: float, step: int, settings: SldSettings, state: SldState):
    """SLD's update, computed in noise units as SLD defines it, returned in x0 space.

    With eps_k = (x - x0_k) / sigma (k = u, p, s): guidance = eps_p - eps_u,
    diff = eps_p - eps_s, scale = clamp(|diff| * s_S, max=1), zero where diff >= threshold,
    safety = scale * (eps_s - eps_u) + s_m * momentum, eps = eps_u + s_g (guidance - safety).
    In x0 space: x0 = x0_cfg + s_g * sigma * safety. ``sigma`` broadcasts over ``[B, C, H, W]``.
    """
    import torch

    diff = (x0_cs - x0_p) / sigma  # eps_p - eps_s
    scale = torch.clamp(diff.abs() * settings.guidance_scale, max=1.0)
    scale = torch.where(diff >= settings.threshold, torch.zeros_like(scale), scale)
    safety = scale * (x0_u - x0_cs) / sigma  # scale * (eps_s - eps_u)
    if state.momentum is None:
        state.momentum = torch.zeros_like(safety)
    safety = safety + settings.momentum_scale * state.momentum
    state.momentum = settings.mom_beta * state.momentum + (1 - settings.mom_beta) * safety
    x0_cfg = x0_u + cond_scale * (x0_p - x0_u)
    if step < settings.warmup_steps:
        return x0_cfg
    return x0_cfg + cond_scale * sigma * safety


@dataclass
class SegaSettings:
    """Semantic guidance (Brack et al. 2023) with one negative concept, diffusers' defaults."""

    edit_scale: float = 5.0
    threshold: float = 0.9
    warmup_fraction: float = 0.2  # diffusers: 10 of 50 steps


def sega_combine(x0_cfg, x0_u, x0_cs, cond_scale: float, settings: SegaSettings):
    """SEGA, negative direction: x0_cfg - s_g * s_e * M_top-p * (x0_cs - x0_u) (x0 space)."""
    direction = x0_cs - x0_u
    mask = top_p_mask(direction, settings.threshold).to(direction.dtype)
    return x0_cfg - cond_scale * settings.edit_scale * mask * direction


# ----------------------------------------------------------------------------- one sampling step


@dataclass
class Guidance:
    """Which safety guidance runs on top of CFG, with its settings and state for one sampling."""

    mode: str = "dag"  # cfg | dag | sld | sega
    dag: DagSettings = field(default_factory=DagSettings)
    sega: SegaSettings = field(default_factory=SegaSettings)
    sld: SldSettings = field(default_factory=lambda: SldSettings.preset("medium"))
    sld_state: SldState = field(default_factory=SldState)

    def reset(self):
        """Forget the SLD momentum: call before each new sampling."""
        self.sld_state = SldState()

    def apply(self, pred_cfg, pred_u, pred_p, safety_pass, step: int, n_steps: int, cond_scale: float,
              a_hat=None, sigma=-1.0):
        """The guided prediction of one step and whether it differs from plain CFG.

        Predictions are x0 (ComfyUI's post-CFG hook, with ``sigma`` the step's noise level) or noise
        (diffusers, ``sigma = -1``: x0 = x - sigma * eps makes every formula above hold for eps).
        ``safety_pass(rows)`` returns the safety condition's prediction for those images of the
        batch (``None``: all); it is called only when the step is guided, so DAG's extra UNet pass
        runs for the detected images only and the others stay plain CFG, bit for bit.
        Warm-ups are fractions of the sampling (DAG: 5 of 50 steps, SEGA 10 of 50; SLD's preset
        counts steps of 50 and is rescaled to ``n_steps``).
        """
        if self.mode == "dag":
            rows = detected_rows(a_hat, self.dag) if step >= round(self.dag.warmup_fraction * n_steps) else []
            if not rows:
                return pred_cfg, False
            out = pred_cfg.clone()
            out[rows] = dag_combine(pred_cfg[rows], pred_u[rows], safety_pass(rows), a_hat[rows].to(pred_cfg.device),
                                    cond_scale, self.dag)
            return out, True
        if self.mode == "sega":
            if step < round(self.sega.warmup_fraction * n_steps):
                return pred_cfg, False
            return sega_combine(pred_cfg, pred_u, safety_pass(None), cond_scale, self.sega), True
        if self.mode == "sld":
            s = self.sld
            warm = SldSettings(round(s.warmup_steps * n_steps / 50), s.guidance_scale, s.threshold, s.momentum_scale,
                               s.mom_beta)
            out = sld_combine(pred_u, pred_p, safety_pass(None), sigma, cond_scale, step, warm, self.sld_state)
            return out, step >= warm.warmup_steps  # SLD runs its pass in warm-up too (its momentum builds up)
        return pred_cfg, False
