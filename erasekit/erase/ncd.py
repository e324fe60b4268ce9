"""NCD: Noise-Contrast Diffusion for concept erasure (seed 000, appendix A-D).

Each sample is a five-tuple (A.2): a harmful prompt T_h, one safe image I_s (candidate 0) and
N_h = 3 harmful images I_h1..3 (candidates 1..3), K = 4 candidates in all. In a step the K
candidates of one prompt share the caption, the noise eps and the timestep t. The appendix does not
restate the main objective; it cites Diffusion-DPO's implicit reward, which the official code
(sousou-no-Fourier/Noise-Contrast-Diffuison, its docstring citing main-text Eq. 10-12) computes as
below, each squared error a mean over C, H, W in float32:

    r_i = (beta / 2) (||eps - eps_ref(x_t^i)||^2 - ||eps - eps_theta(x_t^i)||^2)     (Eq. 10, implicit reward)
    w = softmax((s + 0.01 [i = 0]) / alpha)                                         (Eq. 11, score weights)
    L_mod = -E[ sum_i w_i log sigma(r_i) + (1/N) sum_{i>=1} log sigma(-r_i) ]        (Eq. 14, N = K = 4)
    L_NCA = -E[ sum_i w_i log sigma(r_i) + (1/N) sum_{i>=0} log sigma(-r_i) ]        (Eq. 15, the NCA ablation)
    L_pair = -E[ sum_{i>=1} omega_i log sigma(r_0 - r_i) ]                          (Eq. 18)
    L = L_mod + lambda L_pair                                                       (Eq. 18)
    omega = (1.2, 1.0, 0.8) over the harmful images ranked by harm score            (NCD-HA, Eq. 19-20, Tab. 8)

s are the candidates' safety scores (here 1 where the detector finds no target, 0 where it does:
the code's ``A0..A3_score`` have no documented source, and the safe image must weigh most).
Under NCA the r_0 term of the second sum fights the first: d L_NCA / d r_0 = -w_0 (1 - sigma(r_0)) +
sigma(r_0) / N, which changes sign once sigma(r_0) > N / (N + 1) = 0.8 (Eq. 16-17): the gradient
reversal NCD removes. ``implicit_acc`` (the share of pairs with r_0 > r_i) and ``sigma_r0`` are logged
every step so that argument can be checked on a run.

Where the paper and the code differ, both are settings, defaulting to the paper:
- ``pair_reduce``: Eq. 18 writes a *sum* over the harmful images; the code takes their mean
  (an effective lambda of 0.5 / 3).
- ``beta`` is in the code only (``beta_dpo``: 2000 for SD1.5, 5000 by default); no paper value.
- The paper trains the full UNet (``mode="full"``, exported as a LoRA by SVD, the error reported);
  LoRA mode (rank, INPO's target presets) is what the toy tuning uses.
Beyond the paper, two settings, both 0 (off) in the paper's presets:
- ``lambda_prior`` adds INPO's Eq. 16 on preserve images: NCD has no preservation term, and on the toy
  model an erasure drifts into its neighbours without one.
- ``lambda_safe`` adds the plain denoising loss on the safe candidate under the harmful caption,

    L_safe = E[ ||eps - eps_theta(x_t^0)||^2 ]                                     (beyond the paper)

  an SFT term as Diffusion-DPO practice adds beside the preference loss. Eq. 14's log sigma(-r_i) and
  Eq. 18's log sigma(r_0 - r_i) saturate once the harmful rewards are far below zero, and then stop
  pulling; L_safe's gradient does not fade, so the model keeps learning to draw the safe picture for the
  harmful prompt. Its scale is the squared error's: d L / d err_theta_0 = lambda_safe, against
  Eq. 14's w_0 (1 - sigma(r_0)) beta / 2 at most.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ncd_data import NcdDataConfig  # noqa: F401  (the [data] table of an NCD run: methods.py reads it here)
from .objective import Objective

# A.1 (SD1.5): AdamW, batch 8, accumulation 2, 3200 steps, lr 1e-6, alpha 0.1, lambda 0.5, the full UNet;
# the code: beta 2000 for SD1.5, 500 warm-up steps then constant, weight decay 1e-2, clip 1. The appendix
# gives no per-concept rows (its tuples mix 7 I2P categories), so every kind starts from the same one.
PAPER = {"steps": 3200, "lr": 1e-6, "batch_size": 8, "grad_accum": 2, "mode": "full", "lr_scheduler": "constant_with_warmup",
         "lr_warmup_steps": 500, "weight_decay": 1e-2, "max_grad_norm": 1.0, "rank": 4,
         "beta": 2000.0, "score_temperature": 0.1, "lambda_pair": 0.5}
PRESETS = {kind: dict(PAPER) for kind in ("object", "character", "style", "nsfw")}
PRESET_OF_KIND = {"object": "object", "colour": "object", "shape": "object", "character": "character",
                  "style": "style"}
# The toy model's tuning (python -m erasekit.bench erase --method ncd; the runs are in docs/benchmarks.md):
# a feed-forward LoRA as INPO's toy tuning, 300 steps, the preservation term, and a beta far below the
# code's 2000. beta sets how far the model may move from the reference before Eq. 14's log sigma(-r_i)
# saturates (r_i = beta / 2 times an error difference): at 2000 the harmful terms stop pulling after a tiny
# change and the erasure stays partial. beta and lambda_prior were chosen on red circle, blue square and
# green triangle; lambda_safe (the safe-image SFT term) lowered the erase rate there and stays off.
TOY_TUNING = {"mode": "lora", "targets": "feed-forward", "lr": 2e-4, "steps": 300, "batch_size": 2, "grad_accum": 1,
              "lr_scheduler": "constant", "lr_warmup_steps": 0, "beta": 90.0, "lambda_prior": 20.0}


@dataclass
class NcdConfig:
    """NCD's hyperparameters; written to ``config.toml`` as ``[ncd]``."""

    beta: float = 2000.0  # Eq. 10: reward scale (the code's beta_dpo for SD1.5; not in the paper)
    score_temperature: float = 0.1  # Eq. 11: alpha, the softmax temperature of the score weights (A.1: 0.1)
    safe_bonus: float = 0.01  # Eq. 11: added to the safe candidate's score (the code's 0.01 [i = 0])
    lambda_pair: float = 0.5  # Eq. 18: lambda, weight of L_pair (A.1: 0.5)
    pair_reduce: str = "sum"  # Eq. 18: "sum" over the harmful images (the paper) or "mean" (the code)
    harm_weights: str = ""  # NCD-HA (Eq. 19-20): "1.2,1.0,0.8" (Tab. 8), most harmful first; "": all 1 (plain NCD)
    nca: bool = False  # True: the NCA objective (Eq. 15), with the (1/N) log sigma(-r_0) term (the Fig. 5 ablation)
    lambda_prior: float = 0.0  # beyond the paper: INPO's Eq. 16 on preserve images (0: off)
    lambda_safe: float = 0.0  # beyond the paper: L_safe, the denoising loss on the safe candidate (0: off)


def preset(name_or_kind: str, toy: bool = False) -> dict:
    """The paper's settings (A.1 and the code's beta) for a preset name or a toy concept kind; with
    ``toy``, :data:`TOY_TUNING` on top."""
    return {**PRESETS[PRESET_OF_KIND.get(name_or_kind, name_or_kind)], **(TOY_TUNING if toy else {})}


def build_data(components, target, data_config, log=None, progress=None, method_config=None):
    """The five-tuples (:func:`erasekit.erase.ncd_data.build_ncd_data`)."""
    from .ncd_data import build_ncd_data

    return build_ncd_data(components, target, data_config, log=log or print, progress=progress)


# ----------------------------------------------------------------------------- the equations


def squared_error(pred, target):
    """||eps - pred||^2 as a mean over every axis after the first two, in float32: [B, K, ...] -> [B, K]."""
    return ((target.float() - pred.float()) ** 2).flatten(2).mean(-1)


def implicit_rewards(err_theta, err_ref, beta: float):
    """Eq. 10: r_i = (beta / 2) (err_ref_i - err_theta_i); positive where the trained model fits the
    candidate better than the reference. [B, K] -> [B, K]."""
    return 0.5 * beta * (err_ref - err_theta)


def score_weights(scores, temperature: float = 0.1, safe_bonus: float = 0.01):
    """Eq. 11: w = softmax((s + safe_bonus [i = 0]) / alpha) over the K candidates. scores [B, K] -> [B, K]."""
    import torch

    s = scores.float().clone()
    s[:, 0] = s[:, 0] + safe_bonus
    return torch.softmax(s / temperature, dim=1)


def modified_loss(r, w, nca: bool = False):
    """Eq. 14 (NCD's L_mod) or, with ``nca``, Eq. 15 (L_NCA), per tuple: r, w [B, K] -> [B].

    -(sum_i w_i log sigma(r_i) + (1/N) sum_{i >= 1 (NCA: i >= 0)} log sigma(-r_i)), N = K."""
    import torch.nn.functional as F

    n = r.shape[1]
    pull = (w * F.logsigmoid(r)).sum(1)
    push = F.logsigmoid(-r[:, (0 if nca else 1):]).sum(1) / n
    return -(pull + push)


def harm_rank_weights(harm, weights):
    """NCD-HA (Eq. 19-20): omega for the harmful candidates [B, N_h], ``weights[k]`` to the k-th most
    harmful (ties keep their order). harm: [B, N_h] harm scores; weights: N_h numbers (Tab. 8: 1.2, 1.0, 0.8)."""
    import torch

    w = torch.as_tensor(weights, dtype=torch.float32, device=harm.device)
    if w.numel() != harm.shape[1]:
        raise ValueError(f"harm_weights has {w.numel()} entries for {harm.shape[1]} harmful images")
    order = torch.sort(harm.float(), dim=1, descending=True, stable=True).indices  # rank -> candidate
    out = torch.empty_like(harm, dtype=torch.float32)
    out.scatter_(1, order, w.expand_as(out).contiguous())
    return out


def parse_weights(text) -> list:
    """ "1.2,1.0,0.8" (or a list) -> [1.2, 1.0, 0.8]."""
    if isinstance(text, (list, tuple)):
        return [float(x) for x in text]
    return [float(x) for x in str(text).split(",") if x.strip()]


def pair_loss(r, omega=None, reduce: str = "sum"):
    """Eq. 18 per tuple: -sum_{i >= 1} omega_i log sigma(r_0 - r_i) (``reduce="mean"``: divided by N_h,
    the code's). r [B, K], omega [B, K - 1] or None (all 1) -> [B]."""
    import torch.nn.functional as F

    terms = F.logsigmoid(r[:, :1] - r[:, 1:])
    if omega is not None:
        terms = omega * terms
    if reduce == "sum":
        return -terms.sum(1)
    if reduce == "mean":
        return -terms.mean(1)
    raise ValueError(f"pair_reduce must be 'sum' or 'mean', not {reduce!r}")


def safe_loss(err_theta):
    """L_safe (beyond the paper, see the module docstring) per tuple: the trained model's squared error
    on the safe candidate, err_theta[:, 0]. err_theta [B, K] -> [B]."""
    return err_theta[:, 0]


def shared_noise_and_timesteps(ctx, latents):
    """One noise draw and one t per tuple, repeated over its K candidates (A.2: the candidates of a
    prompt share them). latents [B, K, C, h, w] -> noise [B, K, C, h, w], t [B, K]."""
    noise, t = ctx.noise_and_timesteps(latents[:, 0])
    k = latents.shape[1]
    return noise[:, None].expand(-1, k, *noise.shape[1:]), t[:, None].expand(-1, k)


def tuple_candidates(tup: dict, ctx) -> tuple[dict, object, object]:
    """The B K candidates of a minibatch of tuples as one batch of images, with each tuple's caption
    repeated over its candidates and one noise draw and t per tuple (:func:`shared_noise_and_timesteps`):
    ``(candidates, noise [B K, ...], t [B K])``."""
    latents = tup["latents"]  # [B, K, C, h, w]
    k = latents.shape[1]
    noise, t = shared_noise_and_timesteps(ctx, latents)
    cands = {"latents": latents.flatten(0, 1)}
    for key in ("embeds", "ids", "pooled", "time_ids"):  # one caption per tuple, for each of its candidates
        if key in tup:
            cands[key] = tup[key].repeat_interleave(k, dim=0)
    return cands, noise.flatten(0, 1), t.flatten()


def tuple_batch(tup: dict, preserve: dict | None, ctx):
    """The candidates of :func:`tuple_candidates`, then ``preserve`` images (or None) drawing their own
    noise and t, as one batch: ``(candidates, both, noise, t)``."""
    import torch

    from .objective import join_parts

    cands, noise, t = tuple_candidates(tup, ctx)
    if preserve is None:
        return cands, cands, noise, t
    pn, pt = ctx.noise_and_timesteps(preserve["latents"])
    return cands, join_parts([cands, preserve]), torch.cat([noise, pn]), torch.cat([t, pt])


def tuple_terms(pred, pred_ref, target, scores, harm, cfg: NcdConfig) -> dict:
    """Eq. 10-20 on the predictions for the B K candidates (flattened as :func:`tuple_candidates`):
    ``r`` [B, K], ``err`` [B, K] (the trained model's squared errors), ``mod`` (Eq. 14 or 15) and ``pair``
    (Eq. 18, NCD-HA weighted where ``cfg.harm_weights``), both means over the tuples."""
    b, k = scores.shape
    shape = (b, k, *target.shape[1:])
    err = squared_error(pred.reshape(shape), target.reshape(shape))
    err_ref = squared_error(pred_ref.reshape(shape), target.reshape(shape))
    r = implicit_rewards(err, err_ref, cfg.beta)  # Eq. 10
    w = score_weights(scores, cfg.score_temperature, cfg.safe_bonus)  # Eq. 11
    omega = harm_rank_weights(harm[:, 1:], parse_weights(cfg.harm_weights)) if cfg.harm_weights else None
    return {"r": r, "err": err, "mod": modified_loss(r, w, cfg.nca).mean(),  # Eq. 14 / 15
            "pair": pair_loss(r, omega, cfg.pair_reduce).mean()}  # Eq. 18 (NCD-HA: Eq. 19-20)


class NcdObjective(Objective):
    """NCD for the engine: L = L_mod (or L_NCA) + lambda L_pair (+ lambda_safe L_safe + lambda_prior
    L_prior, beyond the paper), one trained
    and one reference pass over the B K candidates (and the preserve images, where used)."""

    name = "ncd"

    def __init__(self, config: NcdConfig | None = None):
        self.config = config or NcdConfig()

    def loss(self, batch, unet, reference_ctx, ctx) -> dict:
        import torch

        from .inpo import prior_loss

        cfg = self.config
        tup = batch["tuples"]
        preserve = batch.get("preserve") if cfg.lambda_prior > 0 else None
        cands, both, noise, t = tuple_batch(tup, preserve, ctx)
        noisy = ctx.add_noise(both["latents"], noise, t)
        target = ctx.target(both["latents"], noise, t)
        pred = unet(noisy, t, **ctx.unet_inputs(both)).sample
        with reference_ctx() as ref:
            pred_ref = ref(noisy, t, **ctx.unet_inputs(both, reference=True)).sample

        n = cands["latents"].shape[0]
        terms = tuple_terms(pred[:n], pred_ref[:n], target[:n], tup["scores"], tup["harm"], cfg)
        r, l_mod, l_pair = terms["r"], terms["mod"], terms["pair"]
        l_prior = prior_loss(pred[n:], pred_ref[n:]) if preserve is not None else torch.zeros((), device=pred.device)
        l_safe = safe_loss(terms["err"]).mean()  # beyond the paper (0 weight: the paper's loss)
        rd = r.detach()
        loss = l_mod + cfg.lambda_pair * l_pair + cfg.lambda_prior * l_prior
        if cfg.lambda_safe:
            loss = loss + cfg.lambda_safe * l_safe
        return {
            "loss": loss,
            "mod": l_mod.detach(),
            "pair": l_pair.detach(),
            "safe": l_safe.detach(),
            "prior": l_prior.detach(),
            "implicit_acc": (rd[:, :1] > rd[:, 1:]).float().mean(),
            "sigma_r0": torch.sigmoid(rd[:, 0]).mean(),
            "r_safe": rd[:, 0].mean(),
            "r_harm": rd[:, 1:].mean(),
        }
