"""Capture cross-attention maps of a diffusers UNet, layer by layer.

A cross-attention layer (diffusers names it ``...transformer_blocks.N.attn2``) lets each image
position (query) attend over the text tokens (keys). Its attention probabilities
``softmax(Q K^T / sqrt(d))``, averaged over heads and reshaped to the layer's ``h x w`` grid,
are the cross-attention maps (CAMs) that DAAM, OVAM and Detect-and-Guide read.

Layers are chosen by *level*: a layer at level ``l`` works at ``latent / 2**l`` resolution
(SD1.5 at 512 px: level 0 = 64x64, 1 = 32x32, 2 = 16x16, 3 = 8x8). The level is found at run
time from the query length, so the same selection works for any resolution and any UNet.

The ComfyUI side (``nodes/comfy_bridge.AttentionRecorder``) records the same maps through
ComfyUI's attn2 patches; a test checks both agree on the same weights.
"""

from __future__ import annotations

from contextlib import contextmanager


def cross_attention_layers(unet) -> dict[str, object]:
    """``{name: Attention module}`` of every cross-attention (``attn2``) layer of a diffusers UNet."""
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2") and getattr(m, "is_cross_attention", False)}


class _RecordingProcessor:
    """Attention processor that computes attention explicitly and hands the probabilities on.

    Same maths as diffusers' ``AttnProcessor`` for cross-attention (no group norm, no spatial
    norm, no residual in SD's attn2): out = to_out(softmax(q k^T * scale) v).
    """

    def __init__(self, name: str, sink):
        self.name = name
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, nq, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], b)
        probs = attn.get_attention_scores(q, k, attention_mask)  # [B*heads, Nq, Nk]
        out = attn.batch_to_head_dim(probs @ v)
        out = attn.to_out[1](attn.to_out[0](out))
        self.sink(self.name, probs.view(b, attn.heads, nq, -1).mean(1))
        return out


def grid_shape(latent_hw, n: int) -> tuple[int, int, int]:
    """(level, h, w) of a UNet layer with ``n`` positions for a latent ``(H, W)``: each downsampling
    (a stride-2 convolution, padding 1) gives ``ceil(size / 2)``, so a 75 x 100 latent (600 x 800 px)
    has 38 x 50, 19 x 25 and 10 x 13 grids, not sizes scaled by one common ratio."""
    import math

    H, W = latent_hw
    for level in range(12):
        h, w = math.ceil(H / 2**level), math.ceil(W / 2**level)
        if h * w == n:
            return level, h, w
    raise ValueError(f"a layer of {n} positions is no downsampling of a {H} x {W} latent")


def recorded_grid(latent_hw, n: int, levels=None):
    """(h, w) of a layer with ``n`` positions to record, or None: a level outside ``levels`` (None: all),
    or a layer that is no halving of the latent (Deep Shrink's scaled blocks), which sampling still runs."""
    try:
        level, h, w = grid_shape(latent_hw, n)
    except ValueError:
        return None
    return (h, w) if levels is None or level in levels else None


class CrossAttentionCapture:
    """Context manager that records cross-attention maps of chosen layers of a diffusers UNet.

    Example::

        with CrossAttentionCapture(unet, levels=(2, 3)) as cap:
            unet(latents, t, encoder_hidden_states=text).sample
        maps = cap.maps  # {layer name: [tensor [B, h, w, n_tokens], one per forward]}

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        levels: record only layers at these levels (``None``: all).
        batch_slice: which batch entries to keep (e.g. ``slice(B//2, None)`` to keep only the
            conditional half of a classifier-free-guidance batch); ``None`` keeps all.
        keep_last: keep at most this many forwards per layer (``None``: all).
    """

    def __init__(self, unet, levels=None, batch_slice=None, keep_last=None):
        self.unet = unet
        self.levels = None if levels is None else tuple(levels)
        self.batch_slice = batch_slice
        self.keep_last = keep_last
        self.maps: dict[str, list] = {}
        self._latent_hw = None
        self._saved = None
        self._hook = None

    def __enter__(self):
        layers = cross_attention_layers(self.unet)
        self._saved = {n: m.processor for n, m in layers.items()}
        for n, m in layers.items():
            m.set_processor(_RecordingProcessor(n, self._record))
        self._hook = self.unet.register_forward_pre_hook(self._remember_shape, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        layers = cross_attention_layers(self.unet)
        for n, proc in self._saved.items():
            layers[n].set_processor(proc)
        self._hook.remove()
        return False

    def _remember_shape(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self._latent_hw = tuple(sample.shape[-2:])

    def _record(self, name, probs):
        grid = recorded_grid(self._latent_hw, probs.shape[1], self.levels)
        if grid is None:
            return
        h, w = grid
        if self.batch_slice is not None:
            probs = probs[self.batch_slice]
        lst = self.maps.setdefault(name, [])
        lst.append(probs.detach().reshape(probs.shape[0], h, w, probs.shape[-1]).cpu())
        if self.keep_last and len(lst) > self.keep_last:
            del lst[0]


@contextmanager
def capture_cross_attention(unet, levels=None, batch_slice=None, keep_last=None):
    """Functional form of :class:`CrossAttentionCapture`."""
    cap = CrossAttentionCapture(unet, levels, batch_slice, keep_last)
    with cap:
        yield cap


def token_heatmap(maps: dict[str, list], token_indices, size: tuple[int, int], step: int = -1):
    """One ``[B, H, W]`` heatmap in [0, 1] for the given token positions.

    Averages the chosen forward (``step``, default the last) over layers after bilinear
    upsampling to ``size``, sums the chosen tokens' probabilities, then min-max normalises
    each image (as DAAM and OVAM do before thresholding).
    """
    import torch.nn.functional as F

    if not maps:
        raise ValueError("no cross-attention maps were recorded: run the model inside the capture first")
    acc = None
    for per_step in maps.values():
        m = per_step[step][..., list(token_indices)].sum(-1)  # [B, h, w]
        up = F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        acc = up if acc is None else acc + up
    acc = acc / len(maps)
    lo = acc.amin(dim=(1, 2), keepdim=True)
    hi = acc.amax(dim=(1, 2), keepdim=True)
    return (acc - lo) / (hi - lo).clamp_min(1e-8)


def attention_levels(unet) -> list[int]:
    """Levels (0 = full latent resolution) at which the down path has cross-attention."""
    return [i for i, kind in enumerate(unet.config.down_block_types) if "CrossAttn" in kind]


def ldm_cross_attention_levels(diffusion_model) -> dict[str, int]:
    """``{name: level}`` of the cross-attention (``attn2``) layers of an LDM-layout UNet (``input_blocks``,
    ``middle_block``, ``output_blocks``: A1111's and Forge's models), the mid block left out. A level
    counts the ``Downsample`` blocks passed on the way down (the ``Upsample`` blocks on the way up), so
    layer j of the up path sits at the resolution of its twin on the down path, as in diffusers."""
    levels, level = {}, 0
    for i, block in enumerate(diffusion_model.input_blocks):
        levels.update({f"input_blocks.{i}.{n}": level for n, _ in block.named_modules() if n.endswith("attn2")})
        level += any(type(m).__name__ == "Downsample" for m in block.modules())
    for i, block in enumerate(diffusion_model.output_blocks):
        levels.update({f"output_blocks.{i}.{n}": level for n, _ in block.named_modules() if n.endswith("attn2")})
        level -= any(type(m).__name__ == "Upsample" for m in block.modules())
    return levels


def coarse_levels(levels_with_attention) -> tuple[int, ...]:
    """The two coarsest levels with cross-attention, where CAMs are read (DAG Sec. 3.1).

    For SD1.5 at 512 px these are the 32x32 and 16x16 layers that the DAG paper uses; the
    8x8 mid block is left out, as in OVAM's default hooks.
    """
    levels = sorted(levels_with_attention)
    return tuple(levels[-2:])
