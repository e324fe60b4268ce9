"""Detect-and-Guide inside Automatic1111's sampler, without replacing its attention.

Per sampling (``process_before_every_sampling``) one :class:`A1111Dag` is opened (its ``current``):

1. forward pre-hooks on the coarse cross-attention layers (``attn2``) read each call's normalised
   image states and compute the guideline CAMs of the prompt rows (the layer's own ``to_q`` and
   ``to_k``); A1111's attention itself is untouched;
2. ``on_cfg_denoiser`` notes this step's inputs (rows: the prompts of each image, then one
   unconditional row per image, as ``CFGDenoiser`` stacks them), ``on_cfg_denoised`` the predictions;
3. ``on_cfg_after_cfg`` turns this step's CAMs into A-hat and hands the CFG result, the unconditional
   prediction and a safety pass to :class:`~erasekit.dag.session.DagSession`; nothing detected: the
   result is A1111's own tensor, untouched.

k-diffusion samplers predict x0, DDIM / PLMS / UniPC predict noise; Eq. 4 is affine, so it holds in
either space (SLD needs the noise level in x0 space: sigma there, -1 for noise predictions).
A1111 only logs exceptions raised in its callbacks, so a failure is kept in ``error`` and the script
fails the generation (fail closed) instead of letting it finish unguided.
"""

from __future__ import annotations

from .hooks import LayerHooks, coarse_attention_layers, step_rows


class A1111Dag(LayerHooks):
    """Detect-and-Guide for one sampling of ``p`` (an A1111 ``StableDiffusionProcessing``)."""

    def __init__(self, p, embeddings, guidance, safety_text: str, on_failure: str = "stop"):
        import torch

        from erasekit.dag.session import DagSession

        super().__init__(coarse_attention_layers(p.sd_model.model.diffusion_model))
        self.embeddings = list(embeddings)
        self.session = DagSession(guidance, self.embeddings if guidance.mode == "dag" else (), keep_maps=False,
                                  on_failure=on_failure)
        self.p = p
        self.cond_scale = float(p.cfg_scale)
        from modules import prompt_parser

        text = prompt_parser.SdConditioning([safety_text], width=p.width, height=p.height)  # SDXL's size ids
        with torch.no_grad():
            self.safety = p.sd_model.get_learned_conditioning(text)  # [1, 77, C], or SDXL's dict
        self.keys: dict[str, list] = {}
        self.calls: dict[str, list] = {}  # layer -> this step's CAMs, one [rows, n] per concept, call by call
        self.frame = None  # this step's inputs (on_cfg_denoiser) and outputs (on_cfg_denoised)
        self.in_safety_pass = False
        self.i = 0  # model calls so far (second-order samplers, e.g. Heun, make two a step)
        self.steps, self.expected_calls = 1, 1  # the sampling's steps, and the model calls A1111 expects for them
        self.started = False
        self.error = None

    # ------------------------------------------------------------------------------------------ CAMs
    def _pre_hook(self, name):
        def read(module, args, kwargs):
            if self.in_safety_pass or self.frame is None or self.session.detector is None:
                return None
            import torch

            from erasekit.dag.detect import guideline_cam

            x = args[0] if args else kwargs["x"]
            with torch.no_grad():
                if name not in self.keys:
                    self.keys[name] = [e.keys(module.to_k, like=x) for e in self.embeddings]
                q = module.to_q(x)
                self.calls.setdefault(name, []).append(
                    [guideline_cam(q, k, module.heads, e.n_tokens) for k, e in zip(self.keys[name], self.embeddings)])
            return None

        return read

    def _step_cams(self, latent_hw):
        """``[concept][layer] -> [B, h, w]``: each image's mean over its prompt rows (AND prompts)."""
        import torch

        from erasekit.dag.detect import to_grid

        f = self.frame
        per_layer = []
        for calls in self.calls.values():
            rows = [torch.cat(c) for c in zip(*calls)]  # per concept: [all rows of this step, n]
            per_image = [torch.stack([r[a:b].mean(0) for a, b in f["spans"]]) for r in rows]
            per_layer.append([to_grid(m, latent_hw) for m in per_image])
        return [list(layers) for layers in zip(*per_layer)]

    # ------------------------------------------------------------------------------------------ callbacks
    def on_denoiser(self, params):
        """Rows of this step: the prompts of each image, then the unconditional rows."""
        batch, spans = step_rows(params)
        self.frame = {"x": params.x, "sigma": params.sigma, "image_cond": params.image_cond, "uncond": params.text_uncond,
                      "denoiser": params.denoiser, "batch": batch, "spans": spans, "total": params.total_sampling_steps}
        self.calls = {}
        if not self.started:  # one sampling per A1111Dag (a hires fix pass gets its own)
            self.steps = max(int(params.total_sampling_steps), 1)
            self.expected_calls = max(int(getattr(params.denoiser, "total_steps", None) or self.steps), self.steps)
            self.session.start(self.steps)
            self.started = True

    def on_denoised(self, params):
        if self.frame is not None:
            self.frame["out"] = params.x

    def on_after_cfg(self, params):
        if self.frame is None or "out" not in self.frame or self.error is not None:
            return
        try:
            out = self._guide(params.x)
            if out is not params.x:
                params.x = out
                self._show_guided(out)
        except Exception as err:  # A1111 would only log it and sample on, unguided
            import modules.shared as shared
            from modules import errors

            self.error = err
            errors.report(f"Detect-and-Guide stopped: {err}", exc_info=True)
            shared.state.interrupt()
        finally:
            self.frame, self.calls = None, {}

    def _show_guided(self, out):
        """A1111 took this step's x0 for Interrupt / Skip and the live preview before this callback: the
        prompt's own, unguided. Put the guided one in its place."""
        f, b = self.frame, self.frame["batch"]
        denoiser = f["denoiser"]
        if getattr(denoiser, "sampler", None) is not None:
            from modules import sd_samplers_common

            denoiser.sampler.last_latent = denoiser.get_pred_x0(f["x"][-b:], out, f["sigma"][-b:])
            sd_samplers_common.store_latent(denoiser.sampler.last_latent)

    # ------------------------------------------------------------------------------------------ one step
    def _guide(self, pred_cfg):
        import torch

        f, b = self.frame, self.frame["batch"]
        denoiser = f["denoiser"]
        sigma_rows = f["sigma"][-b:]
        eps_space = not hasattr(denoiser.inner_model, "sigma_to_t")  # DDIM / PLMS / UniPC: sigma is the timestep
        timestep = float(sigma_rows[0]) if eps_space else float(denoiser.inner_model.sigma_to_t(sigma_rows[:1])[0])
        scale = self.cond_scale * float(getattr(denoiser, "cond_scale_miltiplier", 1.0))  # A1111's "CFG multiplier"
        pred_u = f["out"][-b:]
        skipping = {"NGMS", "Skip Early CFG"} & set(getattr(self.p, "extra_generation_params", None) or {})
        if skipping and torch.equal(pred_u, f["out"][[start for start, _ in f["spans"]]]):
            # A1111 skipped the negative (NGMS, Skip Early CFG): it copied the prompt's prediction there and
            # combined at CFG 1; the safety direction needs the real negative, so it is computed here
            scale, pred_u = 1.0, self._pass(f["uncond"], None)
        pred_p = pred_u + (pred_cfg - pred_u) / scale  # the prompts' combined prediction (AND weights in)
        a_hat, failed = None, ()
        if self.session.detector is not None:
            cams = self._step_cams(pred_cfg.shape[-2:])
            if not cams:
                from erasekit.dag.session import GuidanceError

                raise GuidanceError("Detect-and-Guide read no attention maps in this step (the model changed mid-sampling, "
                                    "e.g. a refiner?), so it stopped instead of sampling unguided.")
            a_hat, failed = self.session.detect(cams, pred_cfg.shape[-2:], timestep)
        sigma = -1.0 if eps_space else sigma_rows.reshape(-1, *([1] * (pred_cfg.dim() - 1))).to(pred_cfg.dtype)
        step = min(self.i * self.steps // self.expected_calls, self.steps - 1)  # warm-up and SLD count steps, not calls
        out = self.session.step(step, pred_cfg, pred_u, pred_p, lambda rows: self._pass(self.safety, rows), scale,
                                a_hat=a_hat, failed=failed, sigma=sigma)
        self.i += 1
        return out

    def _pass(self, text, rows):
        """The prediction under ``text`` (the safety text's [1, ...] or the negatives' [B, ...] conditioning) for
        images ``rows`` (None: all), as A1111's denoiser computes the unconditional one: same latents, noise
        level and image conditioning."""
        import torch

        f, b = self.frame, self.frame["batch"]
        idx = list(range(b)) if rows is None else list(rows)
        x, sigma, image_cond = f["x"][-b:][idx], f["sigma"][-b:][idx], f["image_cond"][-b:][idx]
        n = len(idx)

        def of_rows(v):  # one row for every image, or each image's own
            return v[:1].expand(n, *v.shape[1:]).to(x.device) if v.shape[0] == 1 else v[idx].to(x.device)

        if isinstance(text, dict):  # SDXL: {"crossattn": ..., "vector": ...}
            cond = {k: of_rows(v) for k, v in text.items()}
            cond["c_concat"] = [image_cond]
        else:
            cond = {"c_crossattn": [of_rows(text)], "c_concat": [image_cond]}
        self.in_safety_pass = True
        try:
            with torch.no_grad():
                return f["denoiser"].inner_model(x, sigma, cond=cond)
        finally:
            self.in_safety_pass = False


on_denoiser = A1111Dag.callback("on_denoiser")
on_denoised = A1111Dag.callback("on_denoised")
on_after_cfg = A1111Dag.callback("on_after_cfg")
