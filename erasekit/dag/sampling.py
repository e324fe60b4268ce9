"""Sampling with a diffusers UNet under plain CFG, DAG, SLD or SEGA.

One loop for the trainer, the benchmarks and diffusers users. The guidance maths comes from
``guidance.py``; its functions are written in x0 space but are linear in the predictions, so
here (noise space) they are applied to noise predictions directly (for SLD, whose thresholds
live in noise units, sigma = -1 gives exactly SLD's noise-space update).

Lazy DAG: the guideline CAMs are read from the conditional pass that runs anyway, through a
forward hook on each coarse layer's ``to_q`` that only *reads* the queries, so the UNet's
computation is untouched; a :class:`~erasekit.dag.session.DagSession` does the per-step rest. The extra pass for the safety condition runs only on steps where
something is detected, and only for the images of the batch where it is; on a benign prompt
the result is bit-identical to plain CFG.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .guidance import DagSettings, Guidance, SegaSettings, SldSettings
from .session import DagSession

MODES = ("cfg", "dag", "sld", "sega")


@dataclass
class SampleResult:
    images: object  # torch [B, 3, H, W] in [0, 1]
    unet_passes: int = 0  # batched UNet calls (the CFG pair counts as one)
    extra_passes: int = 0  # safety-condition passes
    detection_maps: list = field(default_factory=list)  # per step: [B, h, w] A-hat (DAG)
    detection_scores: list = field(default_factory=list)  # per step: [B] peak(A) / gate
    guided_steps: int = 0  # steps where the safety guidance changed the prediction


class GuidelineTap:
    """Reads the queries of the coarse cross-attention layers: this step's guideline CAMs.

    ``cond_slice`` selects the conditional entries of the batch (the second half under CFG).
    """

    def __init__(self, unet, embeddings, cond_slice=slice(None)):
        from .guideline import coarse_layers

        self.layers = coarse_layers(unet)
        self.embeddings = list(embeddings)
        self.cond_slice = cond_slice
        self.queries = {}
        self._keys = None
        self._hooks = []

    def __enter__(self):
        for name, attn in self.layers.items():
            self._hooks.append(attn.to_q.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return False

    def _hook(self, name):
        def read(module, inputs, output):
            self.queries[name] = output[self.cond_slice].detach()

        return read

    def keys(self):
        """Guideline keys per embedding and layer, projected once by each layer's own to_k."""
        import torch

        if self._keys is None:
            with torch.no_grad():
                self._keys = [{n: e.keys(a.to_k) for n, a in self.layers.items()} for e in self.embeddings]
        return self._keys

    def cams(self, latent_hw):
        """This step's CAMs ``[concept][layer] -> [B, h, w]`` from the last forward's queries."""
        from .detect import guideline_cam, to_grid

        return [[to_grid(guideline_cam(self.queries[n], keys[n], self.layers[n].heads, e.n_tokens), latent_hw)
                 for n in self.layers] for keys, e in zip(self.keys(), self.embeddings)]


def clipped_x0_step_kwargs(scheduler) -> dict:
    """``scheduler.step`` keywords that make x0 clipping consistent: with ``use_clipped_model_output``
    DDIM takes the step's noise direction from the clipped x0 (as ComfyUI's samplers do with a
    clamped denoised prediction); diffusers' default pairs the clipped x0 with the unclipped noise.
    Empty for schedulers without the option. Used by this sampler and by ``ToyPipeline``."""
    import inspect

    return {"use_clipped_model_output": True} \
        if "use_clipped_model_output" in inspect.signature(scheduler.step).parameters else {}


def sample(pipe, prompts, seeds, *, steps: int = 25, cfg: float = 5.0, mode: str = "cfg", safety_text: str | None = None,
           embeddings=(), dag: DagSettings | None = None, sld: SldSettings | str = "medium",
           sega: SegaSettings | None = None, scheduler=None, eta: float = 1.0, keep_maps: bool = False,
           on_failure: str = "stop", per_image_noise: bool = False, on_step=None, init_images=None,
           strength: float = 1.0) -> SampleResult:
    """Generate one image per (prompt, seed) with the chosen guidance.

    Args:
        pipe: a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline, or
            :class:`erasekit.models.Components` (SD1.x, SD2.x, SDXL, toy).
        mode: "cfg" (plain), "dag", "sld" or "sega". DAG needs ``embeddings`` (GuidelineEmbedding) and
            ``safety_text``; SLD/SEGA need ``safety_text``.
        eta: DDIM's eta when the scheduler is DDIM (1 = ancestral-like, the toy model's default).
        on_failure: what a non-finite detection map does: "stop" (raise) or "guide_whole_image"
            (:class:`~erasekit.dag.session.DagSession`).
        per_image_noise: draw each image's step noise (DDIM eta > 0) from its own seed, so an image does not
            depend on the batch it was drawn in (the evaluation harness's cache resumes with other batches);
            False: one generator for the batch (the benchmarks' figures were measured so).
        on_step: ``on_step(done, steps)`` after each denoising step (a caller's progress bar).
        init_images: img2img (SDEdit, as diffusers' img2img pipeline): images [B, 3, H, W] in [0, 1]
            encoded by the VAE, noised with the seed's noise to the timestep ``strength`` of the way
            up the schedule, then denoised over the last ``round(steps * strength)`` steps.
    """
    import inspect

    import torch

    if mode not in MODES:
        raise ValueError(f"unknown guidance mode '{mode}'; choose one of {', '.join(MODES)}")
    if mode != "cfg" and not safety_text:
        raise ValueError(f"mode '{mode}' needs the safety concept as text (safety_text)")
    if mode == "dag" and not embeddings:
        raise ValueError("mode 'dag' needs at least one guideline embedding")
    guidance = Guidance(mode, dag or DagSettings(), sega or SegaSettings(),
                        SldSettings.preset(sld) if isinstance(sld, str) else sld)
    from .conditioning import Conditioning, encode, unconditional

    unet, sched = pipe.unet, scheduler or pipe.scheduler
    device = unet.device
    b = len(prompts)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    cond = encode(pipe, prompts, shape[1:])
    both = Conditioning.cat([unconditional(pipe, cond, shape[1:]), cond])  # CFG's pair, one UNet call
    safety = encode(pipe, [safety_text] * b, shape[1:]) if safety_text else None
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    # the noise is drawn in float32 on the CPU (the same images on any device), then moved to the UNet's dtype
    latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, unet.dtype) * sched.init_noise_sigma
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if init_images is not None:
        if not 0 < strength <= 1:
            raise ValueError(f"img2img strength must be in (0, 1], not {strength}")
        timesteps = timesteps[steps - max(1, min(steps, round(steps * strength))):]
        vae = pipe.vae
        with torch.no_grad():  # the inverse of the decode below
            x0 = vae.encode(init_images.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
        noise = latents / sched.init_noise_sigma
        latents = sched.add_noise(x0.to(device, unet.dtype), noise, timesteps[:1].repeat(b)).to(unet.dtype)
    step_kwargs = {"eta": eta} if "eta" in inspect.signature(sched.step).parameters else {}
    step_kwargs.update(clipped_x0_step_kwargs(sched))
    step_gen = torch.Generator().manual_seed(int(seeds[0]) + 7919)
    row_gens = [torch.Generator().manual_seed(int(s) + 7919) for s in seeds] \
        if per_image_noise and "variance_noise" in inspect.signature(sched.step).parameters else None
    # the tap only reads queries: attached in DAG mode, or to watch detection under plain CFG
    watch = bool(embeddings) and (mode == "dag" or keep_maps)
    tap = GuidelineTap(unet, embeddings, cond_slice=slice(b, None)) if watch else None
    session = DagSession(guidance, embeddings if watch else (), keep_maps=keep_maps, on_failure=on_failure)
    session.start(len(timesteps))
    hw = latents.shape[-2:]
    unet_passes = 0
    with torch.no_grad(), (tap if tap is not None else _Null()):
        for i, t in enumerate(timesteps):
            x = sched.scale_model_input(latents, t)
            eps_u, eps_p = unet(torch.cat([x, x]), t, **both.unet_kwargs()).sample.chunk(2)
            unet_passes += 1
            eps = eps_u + cfg * (eps_p - eps_u)
            a_hat, failed = session.detect(tap.cams(hw), hw, float(t)) if tap is not None else (None, ())

            def safety_pass(rows, x=x, t=t):
                return unet(x if rows is None else x[rows], t, **safety.unet_kwargs(rows)).sample

            eps = session.step(i, eps, eps_u, eps_p, safety_pass, cfg, a_hat=a_hat, failed=failed)
            if row_gens is not None:  # the same draws as a batch of one with this seed
                noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in row_gens]).to(latents)
                latents = sched.step(eps, t, latents, variance_noise=noise, **step_kwargs).prev_sample
            else:
                latents = sched.step(eps, t, latents, generator=step_gen, **step_kwargs).prev_sample
            if on_step is not None:
                on_step(i + 1, len(timesteps))
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)  # SDXL's VAE overflows in fp16
        if upcast:
            vae.to(torch.float32)
        try:
            images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
        finally:
            if upcast:
                vae.to(torch.float16)
    log = session.log
    return SampleResult(((images.float() + 1) / 2).clamp(0, 1).cpu(), unet_passes, log.extra_passes, log.maps,
                        log.scores, log.guided_steps)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
