"""ResAlign: erasure that survives downstream fine-tuning (seed 003, NeurIPS 2025).

The erasure LoRA theta is trained against what a fine-tune would make of it. Outer objective
(Eq. 3), with theta* = ADAPT(theta, D_FT, C) a simulated fine-tune:

    min_theta  L_h(theta) + alpha R(theta) + beta [L_h(theta*) - L_h(theta)]                 (Eq. 3)
    grad = (1 - beta) grad L_h(theta) + alpha grad R(theta) + beta grad_theta L_h(theta*)     (Eq. 4)

- L_h, the harm loss (``harm_loss``): "ga", gradient ascent -E||eps_theta - eps||^2 on the forget
  images (the paper), or "inpo", INPO's Eq. 15 against the base model, or "ncd", NCD's
  L_mod + lambda L_pair (seed 000 Eq. 14, 18) on NCD's five-tuples (Tab. 9: the method is
  loss-agnostic; with ``init_lora`` this hardens an existing INPO or NCD erasure), or "relative"
  (beyond the paper): the error relative to the base model's, capped (:mod:`erasekit.erase.harm_losses`).
- R = E||eps_theta - eps_theta0||^2 on the preserve images (INPO's Eq. 16 too), weighted by alpha,
  which the official code ramps from ``alpha_r`` to ``alpha_r_end`` by a sigmoid over the second half
  of training (:meth:`ResAlignObjective.alpha_at`); beta is constant (official 0.8). Beyond the paper,
  ``text_retain`` adds lambda_text R_text, the LoRA's change of the cross-attention keys and values
  on benign prompts (:mod:`erasekit.erase.text_retain`), to alpha R in Eq. 3-4.
- ``net_of_damage`` (beyond the paper): the harm after the simulated fine-tune is taken net of the
  fine-tune's damage to benign images, L_h(theta*; forget) - L_h(theta*; preserve) (:meth:`ResAlignObjective.harm_star`,
  Eq. 3n): a fine-tune that degrades every image raises the forget images' error too, which the
  plain L_h(theta*) reads as erasure, so the hypergradient would favour weights a fine-tune damages.
- grad_theta L_h(theta*) is the Moreau-envelope implicit hypergradient (Eq. 5-7, Alg. 1;
  :mod:`erasekit.erase.hypergrad`): K Richardson iterations with Hessian-vector products of the
  fine-tune loss at theta*, by double backward through :func:`torch.func.functional_call` of the
  unwrapped UNet; K = 1 is the first-order version. Its divergence guard is counted per step.
- ADAPT (Alg. 2): each outer step samples J = ``configs`` rows of the pool (a TOML file,
  :func:`read_pool`; optimizer SGD / Adam with a *fresh* state, lr, steps, plain or DreamBooth prior
  loss, and the weights it moves: ``space`` "lora" the erasure LoRA itself as the official code,
  "merged" the merged weights W0 + s B A of the LoRA's layers, "full" every UNet weight with those
  merged) and runs it on the fine-tuning set D_FT, which mixes benign images with some of the
  target's (B.4: D_FT contains D_harm). The J hypergradients are averaged (first order across
  configs). In "merged" / "full" the IFT runs over the merged weights and z is pulled back to the
  LoRA through the merge's VJP (g_A = s B^T z, g_B = s z A^T, by autograd).

Departures from the official code (recipe ncd-resalign.md, section 2): the divergence guard is
logged and counted, never a silent fall-back; the inner optimizer's state is fresh every outer step
(so a resumed run continues exactly: everything of an outer step is drawn from the step's own
generator); "merged" / "full" start from the current theta, not the last call's; L_h(theta) and
L_h(theta*) see the same noise and timesteps; the Hessian is taken on ``hvp_batch`` images.

v1 limits (refused in :meth:`ResAlignObjective.setup` with one sentence): LoRA mode, fp32, UNet only,
one process (the surrogate gradient bypasses DDP's forward).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import partial

from ..errors import ErasekitError
from .harm_losses import HARM_LOSSES, TUPLE_LOSSES
from .objective import Objective, join_parts
from .resalign_data import finetune_set, load_into
from .weight_space import SPACES, WeightSpace

# One simulated fine-tune a row; "the pool". The toy world's default, meant to bracket a user's
# fine-tune without copying the resilience benchmark's attack (AdamW with weight decay, lr 1e-4,
# batch 4, 50-200 steps): short runs, other optimizers and learning rates, every weight space.
DEFAULT_POOL = [
    {"optimizer": "adam", "lr": 3e-4, "steps": 5, "space": "full", "loss": "plain"},
    {"optimizer": "adam", "lr": 3e-5, "steps": 10, "space": "full", "loss": "plain"},
    {"optimizer": "adam", "lr": 3e-4, "steps": 10, "space": "full", "loss": "prior"},
    {"optimizer": "sgd", "lr": 5e-3, "steps": 10, "space": "full", "loss": "plain"},
    {"optimizer": "adam", "lr": 1e-3, "steps": 10, "space": "merged", "loss": "plain"},
    {"optimizer": "sgd", "lr": 1e-2, "steps": 5, "space": "merged", "loss": "prior"},
    {"optimizer": "adam", "lr": 1e-3, "steps": 10, "space": "lora", "loss": "plain"},
    {"optimizer": "sgd", "lr": 3e-2, "steps": 10, "space": "lora", "loss": "plain"},
]
PRESETS = {
    "object": {"steps": 160, "lr": 2e-4, "rank": 4},  # B.4: AdamW lr 2e-4, 160 outer steps, LoRA r4
    "character": {"steps": 160, "lr": 2e-4, "rank": 4},
    "style": {"steps": 160, "lr": 2e-4, "rank": 4},
    "nsfw": {"steps": 160, "lr": 2e-4, "rank": 4},
}
# The toy model: a LoRA on the cross-attention layers from the base model, the relative harm capped
# at 100 with a heavy preservation weight, batch 4, and the run ends once three checks in a row (every 25
# steps) find the target in none of 16 drawn pictures (stop when erased: the erasure takes off after a
# number of steps that varies with target and seed, and one that was just erased comes back sooner);
# one simulated fine-tune of up to 10 steps and K = 3 per outer step (Tab. 7: J = 1 still works) so a
# run fits the CPU. R_text (text_retain) stays off: it lifts the control's preservation but costs
# ResAlign's erasure survival; net_of_damage stays off: no measurable change. Measured: docs/benchmarks.md.
TOY_TUNING = {"targets": "cross-attention", "lr": 3e-4, "batch_size": 4, "harm_loss": "relative", "harm_cap": 100.0,
              "alpha_r": 1000.0, "alpha_r_end": 1000.0, "steps": 900, "stop_when_erased": True, "erase_check_clean": 3,
              "configs": 1, "iterations": 3, "ncd_beta": 90.0}
# Hardening an existing erasure LoRA (``init_lora``) starts erased: the paper's number of outer steps,
# without the check (its first would end the run), on the layers and rank of the file (trainer.runner).
HARDEN = {"steps": 160, "stop_when_erased": False}
PRESET_OF_KIND = {"object": "object", "colour": "object", "shape": "object", "character": "character",
                  "style": "style"}
OPTIMIZERS, LOSSES = ("sgd", "adam"), ("plain", "prior")


@dataclass
class InnerConfig:
    """One simulated fine-tune (a row of the pool, ``[[config]]`` in its TOML file)."""

    optimizer: str = "sgd"  # sgd | adam (a fresh state every outer step)
    lr: float = 1e-2
    steps: int = 5
    space: str = "lora"  # lora | merged | full: which weights the fine-tune moves
    loss: str = "plain"  # plain denoising | prior: DreamBooth's, plus the denoising loss of preserve images
    batch: int = 2

    def __post_init__(self):
        for key, allowed in (("optimizer", OPTIMIZERS), ("space", SPACES), ("loss", LOSSES)):
            if getattr(self, key) not in allowed:
                raise ErasekitError(f"A ResAlign pool row has {key} = '{getattr(self, key)}'; use one of {', '.join(allowed)}.")
        if self.steps < 1 or self.batch < 1 or not self.lr > 0:
            raise ErasekitError(f"A ResAlign pool row needs steps and batch >= 1 and lr > 0 (got {asdict(self)}).")


@dataclass
class ResAlignConfig:
    """ResAlign's settings; written to ``config.toml`` as ``[resalign]``."""

    beta: float = 0.8  # Eq. 3-4: weight of the post-fine-tune harm (0: the plain control, no hypergradient)
    alpha_r: float = 1.6  # Eq. 3: alpha, the weight of R, at the start ...
    alpha_r_end: float = 2.0  # ... ramped to this by a sigmoid after ramp_start (the official code)
    ramp_start: float = 0.5  # share of the steps before the ramp begins
    harm_loss: str = "ga"  # ga (the paper) | inpo | ncd (Tab. 9) | relative (beyond the paper: error vs the base's, capped)
    harm_cap: float = 5.0  # harm_loss "relative": the most (e_theta - e_0) / e_0 counts
    moreau_gamma: float = 1.0  # Eq. 5: the Moreau envelope's gamma
    iterations: int = 5  # K (Alg. 1): Richardson iterations; 1 = first order
    max_halvings: int = 3  # the guard: gamma is halved at most this often, then first order
    configs: int = 3  # J (Alg. 2): simulated fine-tunes per outer step
    pool: str = ""  # a TOML file of [[config]] rows (InnerConfig); "" = DEFAULT_POOL
    finetune_images: int = 32  # D_FT's size (toy model: rendered scenes)
    finetune_target_share: float = 0.2  # of them, images of the target (forget images)
    finetune_dir: str = ""  # D_FT from a folder of images (.txt captions) instead; needed off the toy model
    hvp_batch: int = 4  # images of the fixed batch whose Hessian the K iterations use
    init_lora: str = ""  # start from this erasure LoRA (kohya or PEFT file): "harden this LoRA"
    use_mask: bool = False  # the harm loss over the concept's mask only (beyond the paper)
    text_retain: float = 0.0  # beyond the paper: weight of R_text, the keys' and values' change on benign prompts (text_retain.py)
    net_of_damage: bool = False  # beyond the paper: L_h(theta*) net of the fine-tune's damage to the preserve images (Eq. 3n)
    text_prompts: int = 256  # toy model: rendered scenes' captions R_text holds (with the preserve images' prompts)
    inpo_eta: float = 1.0  # harm_loss "inpo": INPO Eq. 13-15
    inpo_gamma: float = 3.0
    inpo_tau: float = 0.1
    ncd_beta: float = 2000.0  # harm_loss "ncd": NCD Eq. 10's reward scale (the other NCD settings: NcdConfig's defaults)


def preset(name_or_kind: str, toy: bool = False) -> dict:
    """B.4's training settings for a preset or concept kind; ``toy``: :data:`TOY_TUNING` on top."""
    return {**PRESETS[PRESET_OF_KIND.get(name_or_kind, name_or_kind)], **(TOY_TUNING if toy else {})}


def read_pool(path: str = "") -> list:
    """The pool's rows (:class:`InnerConfig`) from a TOML file of ``[[config]]`` tables; "" = :data:`DEFAULT_POOL`."""
    from .state import read_config

    rows = DEFAULT_POOL if not path else read_config(path).get("config")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ErasekitError(f"The ResAlign pool '{path}' has no [[config]] tables; write one per simulated fine-tune, "
                            "e.g. [[config]] optimizer = \"adam\", lr = 1e-4, steps = 10, space = \"full\".")
    return pool_rows(rows, f"The ResAlign pool '{path}'")


def pool_rows(rows: list, where: str = "The ResAlign pool") -> list:
    """The pool's rows (:class:`InnerConfig`) from dicts (a TOML file's ``[[config]]`` tables, a table's
    rows), each checked: known keys only, one of the choices for ``optimizer`` / ``space`` / ``loss``,
    a number above 0 for ``lr``, whole numbers of at least 1 for ``steps`` and ``batch`` (a float or a
    text is refused, not cast). A bad row is refused with one sentence naming it (``where`` starts the
    sentence: the file, or the page's table)."""
    if not rows:
        raise ErasekitError(f"{where} has no rows; give at least one simulated fine-tune.")
    known = [f.name for f in fields(InnerConfig)]
    out = []
    for i, r in enumerate(rows, 1):
        unknown = set(r) - set(known)
        if unknown:
            raise ErasekitError(f"{where} has unknown keys {sorted(unknown)}; known: {sorted(known)}.")
        choices = {"optimizer": OPTIMIZERS, "space": SPACES, "loss": LOSSES}
        for key, value in r.items():
            if value is None or value == "":
                raise ErasekitError(f"{where}, row {i}, has no {key}; fill it in or remove the row.")
            if key in ("steps", "batch"):
                ok, kind = isinstance(value, int) and not isinstance(value, bool) and value >= 1, "a whole number, at least 1"
            elif key == "lr":
                ok, kind = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf"), \
                    "a number above 0"
            else:
                ok, kind = value in choices[key], f"one of {', '.join(choices[key])}"
            if not ok:
                raise ErasekitError(f"{where}, row {i}, has {key} = {value!r}; it must be {kind}.")
        out.append(InnerConfig(**r))  # its own rules too (the same as above)
    return out


def write_pool(path, pool: list) -> None:
    """The pool as TOML (what :func:`read_pool` reads): the run folder keeps the pool it used."""
    from .state import write_toml

    write_toml(path, {"config": [asdict(c) for c in pool]})


def build_data(components, target, data_config, log=None, progress=None, method_config=None):
    """ResAlign's data: INPO's forget and preserve sets (:func:`~.data.build_erase_data`), or with a
    harm loss on five-tuples (``harm_loss = "ncd"``) NCD's tuples and preserve images
    (:func:`~.ncd_data.build_ncd_data`, its data defaults for the safe pictures)."""
    if method_config is not None and method_config.harm_loss in TUPLE_LOSSES:
        from .ncd_data import build_ncd_data

        return build_ncd_data(components, target, data_config, log=log or print, progress=progress)
    from .data import build_erase_data

    return build_erase_data(components, target, data_config, log=log or print, progress=progress)


# ----------------------------------------------------------------------------- the objective


class ResAlignObjective(Objective):
    """ResAlign for the engine: Eq. 4's gradient through a surrogate loss (the engine's clipping,
    accumulation, checkpoints and resume apply unchanged).

    Terms logged per outer step: ``harm`` L_h(theta), ``harm_star`` L_h(theta*) (mean over the J
    fine-tunes), ``retain`` R, ``alpha``, ``hyper_norm`` ||grad_theta L_h(theta*)||, ``residual`` and
    ``rho`` of the Richardson solve (hypergrad.Solve), ``guard`` (times gamma was halved) and
    ``fallback`` (first-order answers the guard fell back to) summed over the J, ``hvps``, ``drift``
    ||theta* - theta|| (mean), ``objective`` the value of Eq. 3.
    """

    name = "resalign"

    def __init__(self, config: ResAlignConfig | None = None):
        self.config = config or ResAlignConfig()
        self.pool = None
        self.finetune = None  # D_FT, an ImageSet (CPU)
        self.preserve = None  # DreamBooth prior images for "prior" rows
        self.text = None  # R_text (text_retain.TextRetain) when text_retain > 0
        self.total_steps = 1

    # -- set-up ---------------------------------------------------------------------------------

    def setup(self, data, components, train_config, trainable: dict) -> None:
        """Before the first step: refuse what v1 does not do, read the pool, build D_FT and, with
        ``init_lora``, load the LoRA to harden into the trainable weights (a resume overwrites them)."""
        cfg = self.config
        if train_config.mode != "lora":
            raise ErasekitError("ResAlign trains an erasure LoRA (mode = \"lora\"); full-parameter mode is not "
                                "supported yet: leave --mode out.")
        if train_config.mixed_precision != "no":
            raise ErasekitError("ResAlign's Hessian-vector products run in float32 only in this version; "
                                "set --mixed-precision no.")
        if train_config.train_text_encoder:
            raise ErasekitError("ResAlign trains a UNet LoRA only in this version; leave --train-text-encoder off.")
        from accelerate import PartialState

        if PartialState().num_processes > 1:
            raise ErasekitError("ResAlign runs in one process in this version (its surrogate gradient bypasses "
                                "DDP's forward); start it with python, not accelerate launch with several processes.")
        if cfg.harm_loss not in HARM_LOSSES:
            raise ErasekitError(f"ResAlign's harm_loss '{cfg.harm_loss}' is not one of {', '.join(HARM_LOSSES)}.")
        for key in ("iterations", "configs", "hvp_batch"):
            if int(getattr(cfg, key)) < 1:
                raise ErasekitError(f"ResAlign's {key} = {getattr(cfg, key)} must be at least 1.")
        if not 0.0 <= cfg.beta <= 1.0 or not cfg.moreau_gamma > 0:
            raise ErasekitError(f"ResAlign needs 0 <= beta <= 1 and moreau_gamma > 0 (got beta {cfg.beta}, moreau_gamma {cfg.moreau_gamma}).")
        tuples = cfg.harm_loss in TUPLE_LOSSES
        if tuples != (not hasattr(data, "forget")):
            raise ErasekitError(f"ResAlign's harm_loss '{cfg.harm_loss}' trains on "
                                + ("NCD's five-tuples" if tuples else "forget and preserve images")
                                + ", but the data holds " + ("forget images" if tuples else "NCD's five-tuples")
                                + "; make the data again for this harm loss (another data cache or run folder).")
        if cfg.net_of_damage and tuples:
            raise ErasekitError("ResAlign's net_of_damage compares the harm of forget and preserve images; NCD's "
                                "five-tuples have no preserve part in the harm: use harm_loss ga, inpo or relative, or turn it off.")
        self.pool = read_pool(cfg.pool)
        self.total_steps = max(int(train_config.steps), 1)
        self.preserve = getattr(data, "preserve", None)
        no_preserve = self.preserve is None or not len(self.preserve)
        if any(c.loss == "prior" for c in self.pool) and no_preserve:
            raise ErasekitError("The ResAlign pool has prior-preservation rows but the data has no preserve images; "
                                "drop those rows or give preserve images.")
        if cfg.net_of_damage and no_preserve:
            raise ErasekitError("ResAlign's net_of_damage measures a fine-tune's damage on the preserve images, but the "
                                "data has none; give preserve images or turn net_of_damage off.")
        if cfg.beta > 0:
            self.finetune = finetune_set(components, data, cfg, train_config.seed)
        if cfg.init_lora:
            load_into(cfg.init_lora, trainable, train_config)
        from .text_retain import TextRetain, benign_prompts, text_layers

        if cfg.text_retain > 0 and text_layers(components.unet):  # without such layers R_text is 0
            self.text = TextRetain(components.unet, components, benign_prompts(components, data, cfg.text_prompts, train_config.seed))
        from pathlib import Path

        Path(train_config.out).mkdir(parents=True, exist_ok=True)
        write_pool(Path(train_config.out) / "pool.toml", self.pool)

    def alpha_at(self, step: int) -> float:
        """R's weight at outer step ``step``: ``alpha_r`` until ``ramp_start`` of the run, then towards
        ``alpha_r_end`` by the official code's sigmoid 1 / (1 + exp(-10 (p - 0.5))) of the progress p."""
        import math

        cfg = self.config
        start = self.total_steps * cfg.ramp_start
        if step < start or cfg.alpha_r_end == cfg.alpha_r:
            return cfg.alpha_r
        p = min(max((step - start) / max(self.total_steps - start, 1e-9), 0.0), 1.0)
        return cfg.alpha_r + (cfg.alpha_r_end - cfg.alpha_r) / (1 + math.exp(-10 * (p - 0.5)))

    # -- the step -------------------------------------------------------------------------------

    def loss(self, batch, unet, reference_ctx, ctx) -> dict:
        import torch

        from .inpo import prior_loss

        cfg = self.config
        harm_fn = HARM_LOSSES[cfg.harm_loss]
        preserve = batch.get("preserve")
        if "tuples" in batch:  # NCD's five-tuples: the K candidates of a tuple share noise and t
            from .ncd import tuple_batch

            tup = batch["tuples"]
            forget, both, noise, t = tuple_batch(tup, preserve, ctx)
            extra = {"scores": tup["scores"], "harm": tup["harm"]}
        else:
            forget = batch["forget"]
            extra = {"mask": forget.get("masks")}
            both = join_parts([forget] + ([preserve] if preserve is not None else []))
            noise, t = ctx.noise_and_timesteps(both["latents"])
        nf = forget["latents"].shape[0]
        noisy = ctx.add_noise(both["latents"], noise, t)
        target = ctx.target(both["latents"], noise, t)
        kw = ctx.unet_inputs(both)
        pred = unet(noisy, t, **kw).sample
        with reference_ctx() as ref:
            pred_ref = ref(noisy, t, **ctx.unet_inputs(both, reference=True)).sample
        harm = harm_fn(pred[:nf], target[:nf], pred_ref[:nf], extra, cfg)
        retain = prior_loss(pred[nf:], pred_ref[nf:]) if pred.shape[0] > nf else torch.zeros((), device=pred.device)
        alpha = self.alpha_at(ctx.step)
        terms = {"harm": harm.detach(), "retain": retain.detach(), "alpha": alpha}
        keep = alpha * retain  # the preservation terms: alpha R, and lambda_text R_text beyond the paper
        if self.text is not None:
            text = self.text()
            keep = keep + cfg.text_retain * text
            terms["text_retain"] = text.detach()
        if cfg.beta == 0:  # the plain control: Eq. 3 without the fine-tune term
            terms["objective"] = (harm + keep).detach()
            return {"loss": harm + keep, **terms}

        # theta*'s harm is judged on the forget images' x_t, and with net_of_damage the preserve images' too (Eq. 3n)
        n = noisy.shape[0] if cfg.net_of_damage else nf
        harm_call = (noisy[:n].detach(), t[:n], kw if cfg.net_of_damage else ctx.unet_inputs(forget), target[:n],
                     pred_ref[:n], extra, nf)
        hyper, stats = self.hypergradient(ctx, harm_call)
        params = [ctx.trainable[f"unet.{k}"] for k in hyper]
        surrogate = sum((p * h.to(p.dtype)).sum() for p, h in zip(params, hyper.values()))  # gradient = the hypergradient
        loss = (1 - cfg.beta) * harm + keep + cfg.beta * surrogate  # Eq. 4
        terms.update(stats)
        terms["objective"] = (harm + keep + cfg.beta * (stats["harm_star"] - harm)).detach()  # Eq. 3
        return {"loss": loss, **terms}

    def hypergradient(self, ctx, harm_call) -> tuple[dict, dict]:
        """The mean over J sampled fine-tunes of grad_theta L_h(theta*) (Eq. 6-7; with
        ``net_of_damage`` of the net harm, Eq. 3n), keyed by the LoRA's peft names, and the step's statistics."""
        import torch

        from .hypergrad import implicit_hypergradient, norm

        cfg, g = self.config, ctx.generator
        lora = {k.removeprefix("unet."): p for k, p in ctx.trainable.items()}
        total = {k: torch.zeros_like(p) for k, p in lora.items()}
        stats = {"harm_star": 0.0, "residual": 0.0, "rho": 0.0, "guard": 0, "fallback": 0, "hvps": 0, "drift": 0.0}
        if cfg.net_of_damage:
            stats["damage"] = 0.0
        for _ in range(cfg.configs):
            c = self.pool[int(torch.randint(len(self.pool), (1,), generator=g))]
            space = WeightSpace(ctx.base_unet, lora, c.space)
            star = self.adapt(space, c, ctx)
            stats["drift"] += norm({k: star[k] - space.start[k] for k in star}) / cfg.configs
            ft = self._ft_batch(cfg.hvp_batch, ctx, prior=c.loss == "prior")  # one fixed batch for the K iterations
            with ctx.double_backward():
                p = {k: v.detach().requires_grad_(True) for k, v in star.items()}
                harm_star, damage = self.harm_star(space, p, harm_call)
                grads = torch.autograd.grad(harm_star, list(p.values()), allow_unused=True)
                b = {k: (gr if gr is not None else torch.zeros_like(p[k])) for k, gr in zip(p, grads)}
                solve = implicit_hypergradient(partial(self._ft_loss, space, ft=ft, ctx=ctx), star, b, cfg.moreau_gamma,
                                               cfg.iterations, cfg.max_halvings)
            for k, v in space.pull_back(solve.z).items():
                total[k] += v.detach() / cfg.configs
            stats["harm_star"] += float(harm_star.detach()) / cfg.configs
            if damage is not None:
                stats["damage"] += float(damage.detach()) / cfg.configs
            stats["residual"] += solve.residual / cfg.configs
            stats["rho"] = max(stats["rho"], solve.rho)
            stats["guard"] += solve.guard
            stats["fallback"] += int(solve.fallback)
            stats["hvps"] += solve.products
        stats["hyper_norm"] = norm(total)
        return total, stats

    def harm_star(self, space, params, call):
        """L_h at the fine-tuned weights ``params`` on the step's forget images, and with
        ``net_of_damage`` net of the fine-tune's damage (beyond the paper):

            L_h^net(theta*) = L_h(theta*; forget) - L_h(theta*; preserve)                      (Eq. 3n)

        the same harm loss on the preserve images' x_t (the base model's predictions as reference).
        A fine-tune that raises the error of every image alike leaves it unchanged; only the forget
        images' error above the benign ones' counts as erasure that survived. ``call``: x_t, t, the
        UNet's keyword arguments, targets, reference predictions, the loss's extras and the number of
        forget images, which come first. Returns (harm, damage), damage = -L_h(theta*; preserve) or None."""
        cfg = self.config
        harm_fn = HARM_LOSSES[cfg.harm_loss]
        x, t, kw, target, ref, extra, nf = call
        pred = space(params, x, t, kw)
        forget = harm_fn(pred[:nf], target[:nf], ref[:nf], extra, cfg)
        if not cfg.net_of_damage:
            return forget, None
        benign = harm_fn(pred[nf:], target[nf:], ref[nf:], {}, cfg)
        return forget - benign, -benign

    def adapt(self, space: WeightSpace, c: InnerConfig, ctx) -> dict:
        """ADAPT(theta, D_FT, c) of Alg. 2: ``c.steps`` of SGD or Adam (fresh moments, PyTorch's
        defaults) from the current weights, without a graph; returns theta* (detached)."""
        import torch

        params = {k: v.clone().requires_grad_(True) for k, v in space.start.items()}
        m = {k: torch.zeros_like(v) for k, v in params.items()} if c.optimizer == "adam" else None
        v2 = {k: torch.zeros_like(v) for k, v in params.items()} if c.optimizer == "adam" else None
        b1, b2, eps = 0.9, 0.999, 1e-8
        for i in range(1, c.steps + 1):
            loss = self._ft_loss(space, params, self._ft_batch(c.batch, ctx, prior=c.loss == "prior"), ctx)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            with torch.no_grad():
                for (k, p), gr in zip(params.items(), grads):
                    if gr is None:
                        continue
                    if m is None:
                        p -= c.lr * gr
                    else:
                        m[k].mul_(b1).add_(gr, alpha=1 - b1)
                        v2[k].mul_(b2).addcmul_(gr, gr, value=1 - b2)
                        p -= c.lr * (m[k] / (1 - b1 ** i)) / ((v2[k] / (1 - b2 ** i)).sqrt() + eps)
        return {k: p.detach() for k, p in params.items()}

    def _ft_batch(self, n: int, ctx, prior: bool) -> dict:
        """A fine-tuning minibatch of D_FT (and, for a prior row, as many preserve images), with its
        noise and timesteps drawn now from the step's generator."""
        from .data import _pick
        from .engine import _to_device

        parts = [self.finetune.take(_pick(len(self.finetune), n, ctx.generator))]
        if prior:
            parts.append(self.preserve.take(_pick(len(self.preserve), n, ctx.generator)))
        out = []
        for part in parts:
            part = _to_device(part, ctx.device)
            noise, t = ctx.noise_and_timesteps(part["latents"])
            out.append((ctx.add_noise(part["latents"], noise, t), t, ctx.unet_inputs(part),
                        ctx.target(part["latents"], noise, t)))
        return out

    @staticmethod
    def _ft_loss(space, params, ft: list, ctx):
        """L_FT: the denoising loss on D_FT (plus, for a prior row, on preserve images: DreamBooth)."""
        total = 0.0
        for x, t, kw, target in ft:
            total = total + ((space(params, x, t, kw).float() - target.float()) ** 2).mean()
        return total
