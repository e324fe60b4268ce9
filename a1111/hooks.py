"""What the A1111 adapters share: forward pre-hooks on some cross-attention layers for one sampling,
and the layout of the rows of one CFG step."""

from __future__ import annotations


class LayerHooks:
    """Pre-hooks on ``layers`` (``{name: attn2 module}``) while open; the open instance of each subclass is
    its ``current`` (A1111 samples one batch at a time), which the module's CFG callbacks feed."""

    current = None

    def __init__(self, layers: dict):
        self.layers = layers
        self.hooks = []

    def _pre_hook(self, name):
        raise NotImplementedError

    def __enter__(self):
        self.hooks = [m.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True) for name, m in self.layers.items()]
        type(self).current = self
        return self

    def __exit__(self, *exc):
        self.close()

    @classmethod
    def callback(cls, method: str):
        """An A1111 CFG callback that hands its params to the open instance's ``method`` (none open: nothing)."""
        def call(params):
            if cls.current is not None:
                getattr(cls.current, method)(params)

        return call

    @classmethod
    def close_current(cls):
        """Close an instance left open by a generation that raised (A1111 then calls no script's clean-up)."""
        if cls.current is not None:
            cls.current.close()

    def close(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if type(self).current is self:
            type(self).current = None


def step_rows(params) -> tuple[int, list[tuple[int, int]]]:
    """(images B, each image's prompt rows ``(start, end)``) of a ``CFGDenoiserParams``: ``CFGDenoiser`` stacks
    each image's prompts (several with AND), then one unconditional row per image."""
    text = params.text_cond
    n_cond = (text["crossattn"] if isinstance(text, dict) else text).shape[0]
    batch = params.x.shape[0] - n_cond
    conds = getattr(getattr(params.denoiser, "sampler", None), "sampler_extra_args", {}).get("cond")
    repeats = [len(c) for c in conds.batch] if hasattr(conds, "batch") and len(conds.batch) == batch else \
        [n_cond // batch] * batch
    starts = [sum(repeats[:i]) for i in range(batch)]
    return batch, [(s, s + n) for s, n in zip(starts, repeats)]


def coarse_attention_layers(diffusion_model) -> dict:
    """``{name: attn2 module}`` of the layers DAG and the heatmaps read: the two coarsest levels with
    cross-attention, down and up paths (:func:`erasekit.attention.ldm_cross_attention_levels`)."""
    from erasekit.attention import coarse_levels, ldm_cross_attention_levels

    levels = ldm_cross_attention_levels(diffusion_model)
    keep = coarse_levels({lv for name, lv in levels.items() if name.startswith("input_blocks")})
    return {name: diffusion_model.get_submodule(name) for name, lv in levels.items() if lv in keep}


def context_width(diffusion_model) -> int | None:
    """Width of the text states an LDM UNet's cross-attention reads (its ``to_k`` input); None without one."""
    for name, module in diffusion_model.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            return module.to_k.in_features
    return None
