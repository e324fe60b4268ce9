"""The one place where Erasekit meets ComfyUI's internals.

- :func:`comfy_unet_config` / :func:`load_diffusers_unet`: put any diffusers
  ``UNet2DConditionModel`` (the toy model, tiny test models, a diffusers folder) into ComfyUI as
  a real ``ModelPatcher`` around ComfyUI's own ``UNetModel``, so every sampler, scheduler and
  patch works on it. Keys are translated with ComfyUI's own ``comfy.utils.unet_to_diffusers``.
- :class:`AttentionRecorder`: the ComfyUI side of :mod:`erasekit.attention`. It installs attn2
  *replace* patches (they receive q, k, v already projected by the layer) on every
  cross-attention layer, computes softmax(q k^T / sqrt(d)) v itself and keeps the head-averaged
  maps of the conditional batch entries. Layers are named with diffusers' names, derived from
  ComfyUI's key map rather than assumed, so both sides of a test speak of the same layer.

Imported only when a node runs (ComfyUI is importable then); ``erasekit/`` never imports this.
"""

from __future__ import annotations

import torch

from erasekit.attention import recorded_grid


def comfy_unet_config(cfg: dict) -> dict:
    """ComfyUI ``unet_config`` for a diffusers ``UNet2DConditionModel`` config dict.

    diffusers' ``attention_head_dim`` is, for SD1.x-style configs, the number of heads
    (a historical misnomer, see diffusers' UNet2DConditionModel docstring); ``num_attention_heads``
    overrides it when set. SD2/SDXL configs give per-block lists; ComfyUI wants one value.
    """
    blocks = cfg["block_out_channels"]
    n_levels = len(blocks)
    lpb = cfg["layers_per_block"]
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n_levels
    tl = cfg.get("transformer_layers_per_block", 1)
    tl = list(tl) if isinstance(tl, (list, tuple)) else [tl] * n_levels
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    heads = heads if isinstance(heads, (list, tuple)) else [heads] * n_levels
    if len(set(heads)) != 1:
        raise ValueError(f"per-level head counts {heads} are not supported in ComfyUI's UNetModel")
    t_in, t_out = [], []
    for i, kind in enumerate(cfg["down_block_types"]):
        d = tl[i] if "CrossAttn" in kind else 0
        t_in += [d] * lpb[i]
    for i, kind in enumerate(cfg["up_block_types"]):
        d = tl[n_levels - 1 - i] if "CrossAttn" in kind else 0
        # ComfyUI pops output depths from the end, deepest block first: prepend.
        t_out = [d] * (lpb[n_levels - 1 - i] + 1) + t_out
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    adm = None
    if cfg.get("addition_embed_type") == "text_time":
        adm = cfg["projection_class_embeddings_input_dim"]
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "model_channels": blocks[0],
        "num_res_blocks": lpb,
        "channel_mult": [c // blocks[0] for c in blocks],
        "transformer_depth": t_in,
        "transformer_depth_output": t_out,
        "transformer_depth_middle": tl[-1] if mid == "UNetMidBlock2DCrossAttn" else -1,
        "context_dim": cfg["cross_attention_dim"],
        "num_heads": heads[0],
        "num_head_channels": -1,
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": adm,
        "num_classes": "sequential" if adm else None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def _latent_format(channels: int, scale_factor: float):
    import comfy.latent_formats

    class ErasekitLatent(comfy.latent_formats.LatentFormat):
        latent_channels = channels

    fmt = ErasekitLatent()
    fmt.scale_factor = scale_factor
    return fmt


def load_diffusers_unet(unet, scheduler=None, latent_scale: float = 0.18215):
    """A ComfyUI ``ModelPatcher`` holding ComfyUI's UNetModel with ``unet``'s weights.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (its ``config`` and ``state_dict()`` are read).
        scheduler: the diffusers scheduler it was trained with (its betas and prediction type).
        latent_scale: the VAE's ``scaling_factor``; ComfyUI multiplies latents by it on the way in.
    """
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models_base
    import comfy.utils

    sched = dict(scheduler.config) if scheduler is not None else {}
    unet_config = comfy_unet_config(dict(unet.config))
    v_pred = sched.get("prediction_type") == "v_prediction"

    class ErasekitUNet(comfy.supported_models_base.BASE):
        unet_extra_config = {}  # BASE would force num_head_channels=64
        # A plain schedule to construct with; the exact betas of the diffusers scheduler are
        # registered below, so ComfyUI's sigmas equal diffusers' for any beta schedule.
        sampling_settings = {"beta_schedule": "linear", "zsnr": bool(sched.get("rescale_betas_zero_snr", False))}
        supported_inference_dtypes = [torch.float32, torch.float16, torch.bfloat16]

        def model_type(self, state_dict, prefix=""):
            return comfy.model_base.ModelType.V_PREDICTION if v_pred else comfy.model_base.ModelType.EPS

        def inpaint_model(self):  # BASE guesses "inpainting" from in_channels > 4; ours are plain latents
            return False

        def get_model(self, state_dict, prefix="", device=None):
            if unet_config["adm_in_channels"]:
                return comfy.model_base.SDXL(self, model_type=self.model_type(state_dict), device=device)
            return super().get_model(state_dict, prefix, device)

    ErasekitUNet.latent_format = staticmethod(lambda: _latent_format(unet_config["out_channels"], latent_scale))
    model_config = ErasekitUNet(unet_config)
    load_device = comfy.model_management.get_torch_device()
    model_config.set_inference_dtype(torch.float32, None, device=load_device)
    sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    key_map = comfy.utils.unet_to_diffusers(unet_config)  # {diffusers key: ComfyUI key}
    unmapped = sorted(set(sd) - set(key_map))
    new_sd = {key_map[k]: v for k, v in sd.items() if k in key_map}
    model = model_config.get_model(new_sd, "")
    missing, unexpected = model.diffusion_model.load_state_dict(new_sd, strict=False)
    if unmapped or missing or unexpected:
        raise ValueError(
            f"UNet weights do not fit ComfyUI's UNetModel: unmapped {unmapped[:3]}, missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    if scheduler is not None and hasattr(scheduler, "betas"):
        model.model_sampling._register_schedule(given_betas=scheduler.betas.double(),
                                                zsnr=model.model_sampling.zsnr)
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device()
    )
    patcher.model_options.setdefault("transformer_options", {})["erasekit_layer_names"] = attn2_layer_names(unet_config)
    if sched.get("clip_sample"):  # diffusers' x0 clipping, part of how such a (pixel-space) model samples
        bound = float(sched.get("clip_sample_range", 1.0)) * latent_scale
        patcher.set_model_sampler_post_cfg_function(lambda args: args["denoised"].clamp(-bound, bound))
    return patcher


def attn2_layer_names(unet_config: dict) -> dict[tuple, str]:
    """``{(block, number, transformer_index): diffusers attn2 name}`` for every cross-attention
    layer, read off ComfyUI's own diffusers key map (``comfy.utils.unet_to_diffusers``)."""
    import comfy.utils

    names = {}
    suffix = ".attn2.to_q.weight"
    for diff_key, comfy_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if not diff_key.endswith(suffix):
            continue
        parts = comfy_key.split(".")  # input_blocks.4.1.transformer_blocks.0.attn2.to_q.weight
        block = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
        number = 0 if block == "middle" else int(parts[1])
        t_index = int(parts[parts.index("transformer_blocks") + 1])
        names[(block, number, t_index)] = diff_key[: -len(".to_q.weight")]
    return names


class AttentionRecorder:
    """Records head-averaged cross-attention probabilities of the conditional batch entries.

    ``maps[name]`` is a list (one entry per UNet call, in order) of tensors
    ``[B_cond, h, w, n_tokens]`` on the CPU, ``h x w`` being that layer's resolution.
    ``levels`` restricts recording to layers whose resolution is ``latent / 2**level``
    (``None`` records all). Output is identical to ComfyUI's own attention up to float rounding.
    """

    def __init__(self, levels: tuple[int, ...] | None = None, keep_last: int | None = None):
        self.levels = levels
        self.keep_last = keep_last
        self.maps: dict[str, list[torch.Tensor]] = {}

    def clear(self) -> None:
        self.maps = {}

    def patch(self, model_patcher):
        """Clone ``model_patcher`` and install this recorder on each cross-attention layer."""
        m = model_patcher.clone()
        names = m.model_options.get("transformer_options", {}).get("erasekit_layer_names")
        if names is None:
            names = attn2_layer_names(m.model.model_config.unet_config)
        replaced = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for (block, number, t_index), name in names.items():
            # another extension's replacement of this layer (IPAdapter's, say) still computes the output
            earlier = replaced.get((block, number, t_index)) or replaced.get((block, number))
            m.set_model_attn2_replace(self._make_patch(name, earlier), block, number, t_index)
        return m

    def _make_patch(self, name: str, earlier=None):
        def attn2(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            b, nq, inner = q.shape
            d = inner // heads
            qh = q.view(b, nq, heads, d).transpose(1, 2)
            kh = k.view(b, -1, heads, d).transpose(1, 2)
            vh = v.view(b, -1, heads, d).transpose(1, 2)
            probs = (qh.float() @ kh.float().transpose(-1, -2) * d**-0.5).softmax(-1)
            self._record(name, probs.mean(1), extra_options)
            if earlier is not None:
                return earlier(q, k, v, extra_options)
            return (probs.to(vh.dtype) @ vh).transpose(1, 2).reshape(b, nq, inner)

        return attn2

    def _record(self, name: str, probs: torch.Tensor, extra_options: dict) -> None:
        grid = recorded_grid(extra_options["original_shape"][-2:], probs.shape[1], self.levels)
        if grid is None:
            return
        h, w = grid
        chunks = extra_options.get("cond_or_uncond", [0])
        per = probs.shape[0] // max(len(chunks), 1)
        cond = [probs[i * per : (i + 1) * per] for i, c in enumerate(chunks) if c == 0]
        if not cond:
            return
        sel = torch.cat(cond).reshape(-1, h, w, probs.shape[-1]).detach().cpu()
        lst = self.maps.setdefault(name, [])
        lst.append(sel)
        if self.keep_last and len(lst) > self.keep_last:
            del lst[0]


def attention_levels(model_patcher) -> list[int]:
    """Levels of the down path that have cross-attention, from ComfyUI's unet_config."""
    cfg = model_patcher.model.model_config.unet_config
    depth, per_level = cfg["transformer_depth"], cfg["num_res_blocks"]
    out, start = [], 0
    for level, n in enumerate(per_level):
        if any(depth[start : start + n]):
            out.append(level)
        start += n
    return out


def dag_layer_coordinates(model_patcher) -> set[tuple]:
    """ComfyUI's ``(block, number, transformer_index)`` of the layers Detect-and-Guide reads: the
    diffusers path's own rule (:func:`erasekit.dag.guideline.coarse_layer_names`) applied to the
    model's layers under their diffusers names, so both paths read the same layers by construction."""
    from erasekit.attention import coarse_levels
    from erasekit.dag.guideline import coarse_layer_names

    cfg = model_patcher.model.model_config.unet_config
    names = attn2_layer_names(cfg)
    keep = set(coarse_layer_names(names.values(), len(cfg["channel_mult"]), coarse_levels(attention_levels(model_patcher))))
    return {where for where, name in names.items() if name in keep}


def outer_sample_hook(model_patcher, before_sampling):
    """Run ``before_sampling()`` at the start of every sampling with this model (e.g. to clear
    a recorder), through ComfyUI's OUTER_SAMPLE wrapper."""
    import comfy.patcher_extension

    def wrapper(executor, *args, **kwargs):
        before_sampling()
        return executor(*args, **kwargs)

    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "erasekit", wrapper)
