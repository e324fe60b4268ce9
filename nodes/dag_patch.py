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

The same patch runs in Forge, whose UNet patcher mirrors ComfyUI's ModelPatcher: the few host calls
(the safety condition and pass, the start of a sampling, the step index, the CFG scale, the layers)
go through a backend chosen at install time (:mod:`.patch_backend`).
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
        self.reading = True  # whether the attn2 patch reads CAMs now (Forge: the prompt pass of each call only)
        self.failed = None  # the error handed to ``on_error``: the patch stands down for the rest of the sampling


def install(model, embeddings, safety_cond, mode: str = "dag", dag: DagSettings | None = None,
            sld: SldSettings | None = None, sega: SegaSettings | None = None, preview=None, on_failure: str = "stop",
            backend=None, on_error=None):
    """Return a clone of ``model`` (a ComfyUI ModelPatcher, or Forge's UNet patcher) with DAG / SLD / SEGA
    installed; the per-sampling state machine is a :class:`~erasekit.dag.session.DagSession`.

    ``backend``: the host's (:mod:`.patch_backend`; default: ComfyUI's, else Forge's). ``on_error(err)``:
    where an error of the patch goes instead of being raised (a host that would only log it, or sample
    on): the patch then returns the host's own prediction for the rest of the sampling, and the host
    must withhold the images (fail closed)."""
    from erasekit.dag.detect import guideline_cam
    from erasekit.dag.session import DagSession

    from .patch_backend import pick

    host = backend or pick()
    guidance = Guidance(mode, dag or DagSettings(), sega or SegaSettings(), sld or SldSettings.preset("medium"))
    m = model.clone()
    state = HostState()
    session = DagSession(guidance, embeddings if mode == "dag" else (), on_failure=on_failure)
    keys_cache: dict[tuple, list] = {}
    safety = host.convert_cond(safety_cond)
    layers = host.layers(model)  # (block, number, transformer index): the diffusers path's layers

    def attn2_patch(n, context, value, extra_options):
        block, index = tuple(extra_options["block"]), extra_options.get("block_index", 0)
        if mode != "dag" or not state.reading or extra_options.get(SAFETY_PASS) or (*block, index) not in layers:
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

    def extra_pass(args, rows=None):
        """x0 of the safety condition, for the images ``rows`` of the batch (default: all)."""
        negative = (args.get("uncond") or [{}])[0]
        if rows is not None and "control" in negative and len(rows) < args["input"].shape[0]:
            # a ControlNet caches its hint per batch size: a smaller batch would shrink it for every later pass
            return extra_pass(args)[rows]
        x, sigma = args["input"], args["sigma"]
        if rows is not None:
            x, sigma = x[rows], sigma[rows]
        opts = {**args["model_options"], "transformer_options": {**args["model_options"].get("transformer_options", {}),
                                                                 SAFETY_PASS: True}}
        return host.safety_x0(args, safety, x, sigma, rows, state.sample_inputs, opts)

    def post_cfg(args):
        denoised, x0_u, x0_p = args["denoised"], args["uncond_denoised"], args["cond_denoised"]
        if args.get("uncond") is None:  # the host then passes zeros as the unconditional prediction
            raise RuntimeError(host.no_uncond)
        i = host.step_index(args["sigma"], args["model_options"])
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
            timestep = float(host.timestep(args["model"], args["sigma"]).flatten()[0])  # 0..T, for the gate
            a_hat, failed = session.detect(per_concept, denoised.shape[-2:], timestep)
            if preview is not None:  # what was found so far: an erased object stays visible where it was
                preview(session.log.seen, session.steps_before + i, session.n_steps)
        sigma = args["sigma"].reshape(-1, *([1] * (denoised.dim() - 1))).to(denoised.dtype)
        return session.step(i, denoised, x0_u, x0_p, lambda rows: extra_pass(args, rows), host.cond_scale(args),
                            a_hat=a_hat, failed=failed, sigma=sigma)

    def start(steps, first_sigma, last_sigma, shape, sample_inputs):
        """A sampler call begins."""
        continued = session.start(steps, first_sigma, last_sigma, shape)
        if not continued:
            state.cams, state.warned = {}, False
        state.sample_inputs = sample_inputs
        keys_cache.clear()  # weights may have been patched (LoRA) since the last run

    def begin_pass():  # Forge: a CFG call's prompt pass begins; its CAMs are read afresh
        state.cams, state.reading = {}, True

    def end_pass():  # ... and has ended: another extension's pass in this call is not read as the prompt's
        state.reading = False

    if on_error is not None:
        attn2_patch, post_cfg = _reporting(attn2_patch, state, on_error), _reporting(post_cfg, state, on_error)
    host.install(m, session, attn2_patch, post_cfg, start, begin_pass, end_pass)
    return m


def _reporting(fn, state, on_error):
    """``fn`` handing its first error to ``on_error`` instead of raising; from then on it returns what
    the host gave it (the inputs of an attn2 patch, the host's own CFG result): the host withholds the images."""

    def unchanged(*args):  # attn2 patch (n, context, value, extra_options); post-CFG function (args)
        return args[:3] if len(args) > 1 else args[0]["denoised"]

    def call(*args):
        if state.failed is not None:
            return unchanged(*args)
        try:
            return fn(*args)
        except Exception as err:
            state.failed = err
            on_error(err)
            return unchanged(*args)

    return call
