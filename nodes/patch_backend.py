"""The host calls of the Detect-and-Guide patch (:mod:`.dag_patch`): ComfyUI's ``comfy.*`` or Forge's ``backend.*``.

Forge's UNet patcher mirrors ComfyUI's ModelPatcher (``clone``, ``set_model_attn2_patch``,
``set_model_sampler_post_cfg_function``, the same attn2 patch and post-CFG arguments), so one patch
serves both hosts; what differs goes through one of these two classes, chosen at install time
(:func:`pick` tries the imports, as pamparamm/sd-perturbed-attention does):

=================  =====================================  =============================================
                   ComfyUI                                Forge
=================  =====================================  =============================================
safety condition   ``sampler_helpers.convert_cond``       ``sampling.condition.compile_conditions``
safety pass        ``samplers.encode_model_conds`` +      ``sampling_function.calc_cond_uncond_batch``
                   ``samplers.calc_cond_batch``           (the negative's image conditioning carried)
sampling starts    the ``OUTER_SAMPLE`` wrapper           the first pre-CFG call of the patch (the
                                                          patch is installed afresh for every sampling)
step index         ``sample_sigmas`` (transformer opts)   the CFG denoiser's call count (``progress``)
CFG scale          the post-CFG ``cond_scale``            a conditioning modifier (Forge's post-CFG
                                                          arguments have none)
layers read        ``comfy_bridge.dag_layer_coordinates`` the same rule on the LDM layout
                                                          (``erasekit.attention.ldm_cross_attention_levels``)
=================  =====================================  =============================================

Imported by the patch at install time, so it imports no host module at import time.
"""

from __future__ import annotations

import math

import torch


class ComfyBackend:
    """ComfyUI (``comfy.*``)."""

    name = "ComfyUI"
    no_uncond = ("Detect-and-Guide needs the sampler's unconditional (negative) prediction, and this guider has none "
                 "(e.g. BasicGuider). Use KSampler, or CFGGuider with a negative prompt.")

    def convert_cond(self, cond):
        import comfy.sampler_helpers

        return comfy.sampler_helpers.convert_cond(cond)

    def layers(self, model) -> set[tuple]:
        from .comfy_bridge import dag_layer_coordinates

        return dag_layer_coordinates(model)  # (block, number, transformer index): the diffusers path's layers

    def timestep(self, model, sigma):
        return model.model_sampling.timestep(sigma)

    def cond_scale(self, args) -> float:
        return args["cond_scale"]

    def step_index(self, sigma, model_options) -> int:
        """This call's step at ``sigma`` (0 without the sampler's sigmas)."""
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sigmas is None:
            return 0
        return int(torch.argmin((sigmas.float() - float(sigma.flatten()[0])).abs()))

    def safety_x0(self, args, safety, x, sigma, rows, sample_inputs, opts):
        """x0 of the safety condition ``safety`` (converted) for the images ``rows`` (None: all)."""
        import comfy.samplers

        negative = (args.get("uncond") or [{}])[0]
        mdl, batch = args["model"], args["input"].shape[0]
        # the sampling's latent and mask (inpainting models concatenate them) and the negative's ControlNet
        inputs = dict(sample_inputs)
        latent = inputs.get("latent_image")
        if latent is not None:  # as CFGGuider.inner_sample hands it to the conds
            latent = latent.to(x.device, torch.float32)
            inputs["latent_image"] = mdl.process_latent_in(latent) if torch.count_nonzero(latent) > 0 else latent
        inputs = {k: v[rows] if rows is not None and torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v
                  for k, v in inputs.items()}
        conds = [{**c, **{k: negative[k] for k in ("control", "gligen") if k in negative}} for c in safety]
        processed = comfy.samplers.encode_model_conds(mdl.extra_conds, conds, x, x.device, "negative", **inputs)
        (x0_cs,) = comfy.samplers.calc_cond_batch(mdl, [processed], x, sigma, opts)
        return x0_cs

    def install(self, m, session, attn2_patch, post_cfg, start, begin_pass=None, end_pass=None):
        """Put the patch on the clone ``m``; ``start(steps, first_sigma, last_sigma, shape, sample_inputs)``
        runs at the start of every sampler call (ComfyUI's OUTER_SAMPLE wrapper)."""
        import comfy.patcher_extension

        def outer_sample(executor, *args, **kwargs):
            # CFGGuider.outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
            names = ("noise", "latent_image", "sampler", "sigmas", "denoise_mask", "callback", "disable_pbar", "seed")
            given = {**dict(zip(names, args)), **kwargs}
            sigmas, shape = given.get("sigmas"), tuple(getattr(given.get("noise"), "shape", ()))
            # a sampling split over two KSamplerAdvanced (the first returns its leftover noise) is one sampling
            has = sigmas is not None and len(sigmas) > 0
            start(len(sigmas) - 1 if has else 0, float(sigmas[0]) if has and len(sigmas) > 1 else None,
                  float(sigmas[-1]) if has else None, shape, {k: given.get(k) for k in ("latent_image", "denoise_mask", "seed")})
            return executor(*args, **kwargs)

        m.set_model_attn2_patch(attn2_patch)
        m.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=True)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "erasekit_dag", outer_sample)
        m.model_options.setdefault("transformer_options", {})["erasekit_dag_session"] = session


class ForgeBackend:
    """Forge (``backend.*``, lllyasviel/stable-diffusion-webui-forge), its UNet patcher being
    ``p.sd_model.forge_objects.unet``.

    Args:
        progress: ``() -> (call, calls)``: the CFG denoiser's call of this sampling (from 0) and the calls
            it expects (its ``step`` and ``total_steps``: Forge's own measure of progress, e.g. for the
            refiner switch); a second-order sampler counts both of a step's calls.
    """

    name = "Forge"
    no_uncond = ("Detect-and-Guide needs the unconditional (negative) prediction, which Forge skips at a CFG scale of 1 "
                 "(for the hires fix pass: its Hires CFG Scale); set it above 1.")

    def __init__(self, progress):
        self.progress = progress
        self.scale = None  # this call's CFG scale (Forge's post-CFG arguments do not carry it)
        self.session = None  # the DagSession of the patch installed with this backend

    def convert_cond(self, cond):
        """``get_learned_conditioning``'s output (a tensor, or SDXL's dict) as Forge's conds."""
        from backend.sampling.condition import compile_conditions

        return compile_conditions(cond)

    def layers(self, model) -> set[tuple]:
        """``(block, number, transformer index)`` of the layers the diffusers path reads, by the LDM-layout
        rule A1111 uses (tested to equal ComfyUI's :func:`~.comfy_bridge.dag_layer_coordinates`)."""
        from erasekit.attention import coarse_levels, ldm_cross_attention_levels

        levels = ldm_cross_attention_levels(model.model.diffusion_model)
        keep = coarse_levels({lv for name, lv in levels.items() if name.startswith("input_blocks")})
        out = set()
        for name, lv in levels.items():
            if lv in keep:
                parts = name.split(".")
                block = {"input_blocks": "input", "output_blocks": "output"}[parts[0]]
                out.add((block, int(parts[1]), int(parts[parts.index("transformer_blocks") + 1])))
        return out

    def timestep(self, model, sigma):
        return model.predictor.timestep(sigma)

    def cond_scale(self, args) -> float:
        return self.scale

    def step_index(self, sigma, model_options) -> int:
        return int(self.progress()[0])

    def safety_x0(self, args, safety, x, sigma, rows, sample_inputs, opts):
        """x0 of the safety condition for the images ``rows`` (None: all), with the negative's image
        conditioning (``c_concat`` of inpainting models; its rows) and ControlNet."""
        from backend.sampling.sampling_function import calc_cond_uncond_batch

        negative = (args.get("uncond") or [{}])[0]
        batch = args["input"].shape[0]

        def rows_of(c):
            t = getattr(c, "cond", None)
            if rows is None or not torch.is_tensor(t) or not t.dim() or t.shape[0] != batch:
                return c
            return c._copy_with(t[rows])

        conds = []
        for c in safety:
            own = c["model_conds"]
            carried = {k: rows_of(v) for k, v in negative.get("model_conds", {}).items() if k not in own}
            conds.append({**c, "model_conds": {**carried, **own}, **({"control": negative["control"]} if "control" in negative else {})})
        x0_cs, _ = calc_cond_uncond_batch(args["model"], conds, None, x, sigma, opts)
        return x0_cs

    def install(self, m, session, attn2_patch, post_cfg, start, begin_pass=None, end_pass=None):
        """Put the patch on the clone ``m`` (one sampling's). The sampling starts at the first CFG call;
        each call's CAMs are read from its prompt pass only: from the pre-CFG hook (after every
        conditioning modifier) to the first post-CFG function (before another extension's extra pass)."""
        self.session = session

        def record_scale(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
            strength = sum(c.get("strength", 1) for c in cond)  # AND prompts: Forge scales CFG by their weights
            plain = "sampler_cfg_function" in model_options or math.isclose(strength, 1.0)
            self.scale = cond_scale if plain else cond_scale * strength
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed

        started = []

        def pre_cfg(model, cond, uncond, x, timestep, model_options):
            call, calls = self.progress()
            if call == 0 or not started:
                start(int(calls), None, None, tuple(x.shape), {})
                started.append(True)
            if begin_pass is not None:
                begin_pass()
            return model, cond, uncond, x, timestep, model_options

        def prompt_pass_done(args):
            if end_pass is not None:
                end_pass()
            return args["denoised"]

        m.set_model_attn2_patch(attn2_patch)
        m.add_conditioning_modifier(record_scale)
        m.set_model_sampler_pre_cfg_function(pre_cfg, disable_cfg1_optimization=True)
        m.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=True)
        m.model_options["sampler_post_cfg_function"].insert(0, prompt_pass_done)


def pick(progress=None):
    """The backend of the host this runs in: ComfyUI if ``comfy`` imports, else Forge (which then needs
    ``progress``, see :class:`ForgeBackend`)."""
    try:
        import comfy.samplers  # noqa: F401
    except ImportError:
        pass
    else:
        return ComfyBackend()
    try:
        import backend.sampling.sampling_function  # noqa: F401
    except ImportError:
        raise RuntimeError("Detect-and-Guide's patch runs in ComfyUI or Forge; neither is importable here.") from None
    if progress is None:
        raise ValueError("In Forge the patch needs the sampler's progress: install(..., backend=ForgeBackend(progress)).")
    return ForgeBackend(progress)
