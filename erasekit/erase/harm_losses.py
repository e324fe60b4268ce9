"""ResAlign's harm losses L_h (seed 003, Eq. 3; Tab. 9: the method is loss-agnostic).

Each is f(pred, target, pred_ref, extra, config) -> a scalar to minimise: pred, target and pred_ref
over the harmful images (NCD: the candidates of its five-tuples), pred_ref the base model's
prediction on the same x_t, extra what else the loss reads ({"mask"}; NCD's {"scores", "harm"}),
config a :class:`~.resalign.ResAlignConfig`. A loss in :data:`TUPLE_LOSSES` trains on NCD's
five-tuples (the data follows the loss).
"""

from __future__ import annotations


def ga_harm(pred, target, pred_ref, extra, cfg):
    """L_h of the paper: gradient ascent, -||eps_theta - eps||^2 (a mean; over the mask with ``use_mask``)."""
    from .inpo import masked_score

    return -masked_score(pred, target, _mask(extra, cfg)).mean()


def inpo_harm(pred, target, pred_ref, extra, cfg):
    """L_h = INPO's Eq. 15 (bounded): 2 alpha(dS) log(1 + exp(-eta dS)), dS against the base model."""
    from .inpo import inpo_loss, masked_score

    mask = _mask(extra, cfg)
    delta = masked_score(pred, target, mask) - masked_score(pred_ref, target, mask)
    return inpo_loss(delta, cfg.inpo_eta, cfg.inpo_gamma, cfg.inpo_tau).mean()


def relative_harm(pred, target, pred_ref, extra, cfg):
    """L_h = -E[min((e_theta - e_0) / e_0, cap)] (beyond the paper): the forget images' denoising error
    relative to the base model's on the same x_t. Dividing by e_0 weighs every timestep alike (the raw
    error spans orders of magnitude over t, so GA's and INPO's per-batch values are mostly timestep
    noise); the cap ``harm_cap`` bounds the ascent, which GA's loss does not."""
    import torch

    from .inpo import masked_score

    mask = _mask(extra, cfg)
    e, e0 = masked_score(pred, target, mask), masked_score(pred_ref, target, mask).detach()
    return -torch.clamp((e - e0) / (e0 + 1e-3), max=cfg.harm_cap).mean()


def ncd_harm(pred, target, pred_ref, extra, cfg):
    """L_h = NCD's L_mod + lambda L_pair (seed 000 Eq. 14, 18) on the B K candidates of B five-tuples, flattened
    as :func:`~.ncd.tuple_candidates` gives them; ``extra``: the tuples' ``scores`` and ``harm`` [B, K].
    NCD's settings are :class:`~.ncd.NcdConfig`'s defaults (the paper's), with ``ncd_beta`` for beta."""
    from .ncd import NcdConfig, tuple_terms

    ncd = NcdConfig(beta=cfg.ncd_beta)
    terms = tuple_terms(pred, pred_ref, target, extra["scores"], extra["harm"], ncd)
    return terms["mod"] + ncd.lambda_pair * terms["pair"]


def _mask(extra, cfg):
    return extra.get("mask") if cfg.use_mask else None


HARM_LOSSES = {"ga": ga_harm, "inpo": inpo_harm, "relative": relative_harm, "ncd": ncd_harm}
TUPLE_LOSSES = ("ncd",)
