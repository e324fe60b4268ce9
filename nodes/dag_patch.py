"""Detect-and-Guide inside ComfyUI's sampler: two patches on a cloned MODEL.

1. An ``attn2_patch`` (called before every cross-attention with the normalised image states)
   that, on the layers the diffusers path reads (``comfy_bridge.dag_layer_coordinates``) and for
   the positive prompts' batch entries only (``cond_or_uncond == 0``; one CAM per positive prompt,
   averaged per image; an area prompt's crop left out), computes the layer's queries and their
   attention to the guideline keys: the CAMs. It returns its inputs unchanged, so the attention
   ComfyUI computes is untouched, and it stands down during any Detect-and-Guide safety pass.
2. A ``sampler_post_cfg_function`` that turns this step's CAMs into A-hat. Where nothing is
   detected (or during warm-up) it returns ComfyUI's own CFG result object as is; where
   something is, it runs one extra pass for the safety condition (``calc_cond_batch``, as
   ComfyUI's Perp-Neg does) and applies DAG's Eq. 4 in x0 space (``erasekit.dag.guidance``).
SLD and SEGA modes run through the same post-CFG hook (always with the extra pass).
"""

from __future__ import annotations

import logging
import math

import torch

from erasekit.dag.guidance import DagSettings, Guidance, SegaSettings, SldSettings

# set in transformer_options during a safety pass, so that no Detect-and-Guide patch (this node's or a
# chained one's) reads CAMs from features conditioned on the safety text
SAFETY_PASS = "erasekit_dag_safety_pass"


def _transformer_block(diffusion_model, block, index):
    """The BasicTransformerBlock ComfyUI calls ``(block, index)`` (its patch coordinates)."""
    kind, number = block
    container = {"input": diffusion_model.input_blocks, "output": diffusion_model.output_blocks}.get(kind)
    seq = diffusion_model.middle_block if kind == "middle" else container[number]
    for layer in seq:
        if hasattr(layer, "transformer_blocks"):
            return layer.transformer_blocks[index]
    raise KeyError(f"no transformer at {block}")


class HostState:
    """What the patch itself keeps per sampling: this step's CAMs and the sampling's own inputs."""

    def __init__(self):
        self.cams: dict[tuple, list] = {}  # layer -> [(level, uuid, [per-concept CAM [B, h, w]]), ...] of this step
        self.sample_inputs: dict = {}  # latent_image, denoise_mask, seed of the sampling (for the safety cond)
        self.warned = False  # the area-prompts warning, once per sampling


def install(model, embeddings, safety_cond, mode: str = "dag", dag: DagSettings | None = None,
            sld: SldSettings | None = None, sega: SegaSettings | None = None, preview=None, on_failure: str = "stop"):
    """Return a clone of ``model`` (a ComfyUI ModelPatcher) with DAG / SLD / SEGA installed; the
    per-sampling state machine is a :class:`~erasekit.dag.session.DagSession`."""
    import comfy.patcher_extension
    import comfy.sampler_helpers
    import comfy.samplers

    from erasekit.dag.detect import guideline_cam
    from erasekit.dag.session import DagSession

    from .comfy_bridge import dag_layer_coordinates

    guidance = Guidance(mode, dag or DagSettings(), sega or SegaSettings(), sld or SldSettings.preset("medium"))
    m = model.clone()
    state = HostState()
    session = DagSession(guidance, embeddings if mode == "dag" else (), on_failure=on_failure)
    keys_cache: dict[tuple, list] = {}
    safety = comfy.sampler_helpers.convert_cond(safety_cond)
    layers = dag_layer_coordinates(model)  # (block, number, transformer index): the diffusers path's layers

    def attn2_patch(n, context, value, extra_options):
        block, index = tuple(extra_options["block"]), extra_options.get("block_index", 0)
        if mode != "dag" or extra_options.get(SAFETY_PASS) or (*block, index) not in layers:
            return n, context, value
        H, W = extra_options["original_shape"][-2:]
        level = round(math.log2(math.sqrt(H * W / n.shape[1])))
        chunks = extra_options.get("cond_or_uncond", [0])
        uuids = extra_options.get("uuids") or [None] * len(chunks)
        per = n.shape[0] // len(chunks)
        cond = [(uuids[i], n[i * per : (i + 1) * per]) for i, c in enumerate(chunks) if c == 0]
        if not cond:
            return n, context, value
        where = (block, index)
        attn = _transformer_block(m.model.diffusion_model, *where).attn2
        if where not in keys_cache:
            with torch.no_grad():
                keys_cache[where] = [e.keys(attn.to_k, like=n) for e in embeddings]
        with torch.no_grad():
            h, w = math.ceil(H / 2**level), math.ceil(W / 2**level)
            for uuid, c in cond:  # one chunk per cond batched in this call (Conditioning (Combine): several)
                q = attn.to_q(c)
                state.cams.setdefault(where, []).append(
                    (level, uuid, [guideline_cam(q, k, extra_options["n_heads"], e.n_tokens).reshape(-1, h, w)
                                   for k, e in zip(keys_cache[where], embeddings)]))
        return n, context, value

    def step_cams(latent_hw, batch, positive):
        """This step's CAMs ``[concept][layer] -> [B, h, w]``: per layer, the mean over the positive
        prompts (by their uuids; ``cond_or_uncond`` 0 alone also tags another extension's own passes,
        e.g. Self-Attention Guidance's) whose map covers the whole latent (an area prompt's crop is
        left out: where it sits is not known here)."""
        per_layer = []
        for entries in state.cams.values():
            full = [cams for level, uuid, cams in entries if (uuid is None or uuid in positive) and tuple(cams[0].shape) ==
                    (batch, math.ceil(latent_hw[0] / 2**level), math.ceil(latent_hw[1] / 2**level))]
            if full:
                per_layer.append([torch.stack(maps).mean(0) for maps in zip(*full)])
        return list(zip(*per_layer))

    def step_index(sigma, model_options) -> int:
        """This call's step at ``sigma`` (0 without the sampler's sigmas)."""
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sigmas is None:
            return 0
        return int(torch.argmin((sigmas.float() - float(sigma.flatten()[0])).abs()))

    def extra_pass(args, rows=None):
        """x0 of the safety condition, for the images ``rows`` of the batch (default: all)."""
        negative = (args.get("uncond") or [{}])[0]
        if rows is not None and "control" in negative and len(rows) < args["input"].shape[0]:
            # a ControlNet caches its hint per batch size: a smaller batch would shrink it for every later pass
            return extra_pass(args)[rows]
        x, sigma = args["input"], args["sigma"]
        if rows is not None:
            x, sigma = x[rows], sigma[rows]
        mdl, batch = args["model"], args["input"].shape[0]
        opts = {**args["model_options"], "transformer_options": {**args["model_options"].get("transformer_options", {}),
                                                                 SAFETY_PASS: True}}
        # the sampling's latent and mask (inpainting models concatenate them) and the negative's ControlNet
        inputs = dict(state.sample_inputs)
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

    def post_cfg(args):
        denoised, x0_u, x0_p = args["denoised"], args["uncond_denoised"], args["cond_denoised"]
        if args.get("uncond") is None:  # ComfyUI then passes zeros as the unconditional prediction
            raise RuntimeError("Detect-and-Guide needs the sampler's unconditional (negative) prediction, and this "
                               "guider has none (e.g. BasicGuider). Use KSampler, or CFGGuider with a negative prompt.")
        i = step_index(args["sigma"], args["model_options"])
        a_hat, failed = None, ()
        if mode == "dag":
            positive = {c.get("uuid") for c in args.get("cond") or []}
            per_concept = step_cams(denoised.shape[-2:], denoised.shape[0], positive)  # [concept][layer]
            had_cams, state.cams = bool(state.cams), {}
            if not per_concept:
                if had_cams and not state.warned:
                    state.warned = True
                    logging.warning("Detect-and-Guide: every positive prompt is limited to an area, so nothing is "
                                    "detected; add a prompt over the whole image (Conditioning (Combine)).")
                return denoised
            timestep = float(args["model"].model_sampling.timestep(args["sigma"]).flatten()[0])  # 0..T, for the gate
            a_hat, failed = session.detect(per_concept, denoised.shape[-2:], timestep)
            if preview is not None:  # what was found so far: an erased object stays visible where it was
                preview(session.log.seen, session.steps_before + i, session.n_steps)
        sigma = args["sigma"].reshape(-1, *([1] * (denoised.dim() - 1))).to(denoised.dtype)
        return session.step(i, denoised, x0_u, x0_p, lambda rows: extra_pass(args, rows), args["cond_scale"],
                            a_hat=a_hat, failed=failed, sigma=sigma)

    def outer_sample(executor, *args, **kwargs):
        # CFGGuider.outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        names = ("noise", "latent_image", "sampler", "sigmas", "denoise_mask", "callback", "disable_pbar", "seed")
        given = {**dict(zip(names, args)), **kwargs}
        sigmas, shape = given.get("sigmas"), tuple(getattr(given.get("noise"), "shape", ()))
        # a sampling split over two KSamplerAdvanced (the first returns its leftover noise) is one sampling
        has = sigmas is not None and len(sigmas) > 0
        continued = session.start(len(sigmas) - 1 if has else 0, float(sigmas[0]) if has and len(sigmas) > 1 else None,
                                  float(sigmas[-1]) if has else None, shape)
        if not continued:
            state.cams, state.warned = {}, False
        state.sample_inputs = {k: given.get(k) for k in ("latent_image", "denoise_mask", "seed")}
        keys_cache.clear()  # weights may have been patched (LoRA) since the last run
        return executor(*args, **kwargs)

    m.set_model_attn2_patch(attn2_patch)
    m.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=True)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "erasekit_dag", outer_sample)
    m.model_options.setdefault("transformer_options", {})["erasekit_dag_session"] = session
    return m
