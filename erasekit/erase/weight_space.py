"""The weights a simulated fine-tune moves (ResAlign, :mod:`erasekit.erase.resalign`), as dicts for
:func:`torch.func.functional_call` of the peft-wrapped UNet: "lora" the erasure LoRA itself (the official
code), "merged" the merged weights W0 + s B A of the LoRA's layers, "full" every UNet weight with those
merged. No module weight is ever written. A gradient over a space comes back to the LoRA through the
merge's vector-Jacobian product (g_A = s B^T z, g_B = s z A^T, by autograd)."""

from __future__ import annotations

from contextlib import contextmanager

SPACES = ("lora", "merged", "full")


def lora_layers(unet) -> dict:
    """``{module name: peft LoraLayer}`` of the adapter "default" in ``unet``."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}


def merged_weights(layers: dict, lora: dict) -> dict:
    """``{"<layer>.base_layer.weight": W0 + s B A}`` for each LoRA layer, differentiable in ``lora``
    (``{"<layer>.lora_A.default.weight": A, ...}``); a conv LoRA's B is 1x1 (peft), as kohya's."""
    out = {}
    for name, layer in layers.items():
        a, b = lora[f"{name}.lora_A.default.weight"], lora[f"{name}.lora_B.default.weight"]
        w0 = layer.base_layer.weight
        delta = (b.flatten(1) @ a.flatten(1)).reshape(w0.shape)
        out[f"{name}.base_layer.weight"] = w0.detach() + layer.scaling["default"] * delta
    return out


class WeightSpace:
    """The weights a simulated fine-tune moves, as a dict for :func:`torch.func.functional_call` of
    the unwrapped UNet (no module weight is ever written), and the way back to the LoRA.

    unet: the peft-wrapped base UNet; lora: ``{peft name: Parameter}`` of its adapter.
    """

    def __init__(self, unet, lora: dict, kind: str):
        self.unet, self.lora, self.kind = unet, lora, kind
        if kind == "lora":
            self.start = {k: v.detach().clone() for k, v in lora.items()}
            return
        self.layers = lora_layers(unet)
        with _no_grad():
            self.start = {k: v.clone() for k, v in merged_weights(self.layers, lora).items()}
        if kind == "full":  # every other UNet weight too (the merged ones replace the base layers')
            for name, p in unet.named_parameters():
                if ".lora_" not in name and name not in self.start:
                    self.start[name] = p.detach().clone()

    def __call__(self, params: dict, x, t, kwargs):
        """eps (or v) of the UNet with ``params`` in place of its own weights."""
        from torch.func import functional_call

        if self.kind == "lora":
            return functional_call(self.unet, params, (x, t), kwargs).sample
        with _adapters_disabled(self.unet):  # merged weights stand for W0 + s B A
            return functional_call(self.unet, params, (x, t), kwargs).sample

    def pull_back(self, z: dict) -> dict:
        """A gradient over this space's weights as one over the LoRA's: z itself in "lora", else the
        merge's VJP (weights the LoRA does not reach drop out: they are not trained)."""
        import torch

        if self.kind == "lora":
            return {k: z[k] for k in self.lora}
        lora = {k: v.detach().requires_grad_(True) for k, v in self.lora.items()}
        merged = merged_weights(self.layers, lora)
        keys = list(merged)
        grads = torch.autograd.grad([merged[k] for k in keys], list(lora.values()), grad_outputs=[z[k] for k in keys])
        return dict(zip(lora, grads))


@contextmanager
def _adapters_disabled(unet):
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def _no_grad():
    import torch

    return torch.no_grad()
