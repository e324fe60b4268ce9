"""R_text (beyond the papers): how much an erasure LoRA changes the cross-attention keys and values
of benign prompts' tokens.

A cross-attention LoRA changes what the image attends to, token by token of the prompt. The
preservation term on preserve *images* (R, INPO Eq. 16) holds only the prompts of those images;
the keys and values of any prompt cost no image to compute, so this term holds them for many
benign prompts (two objects side by side included, which the preserve images rarely show):

    R_text(theta) = mean_l  E_c ||dW_l c||^2 / E_c ||W_l c||^2                             (R_text)

over the LoRA's layers l that read the text (the cross-attention's ``to_k`` and ``to_v``), c the text
encoder's output at each token of a benign prompt, dW_l = s B A the LoRA's change of W_l. Divided
by the layer's own output, so one weight suits every layer and model. A LoRA without such layers (a
feed-forward one) leaves every key and value as it was: R_text = 0.
"""

from __future__ import annotations

import re

from ..errors import ErasekitError

TEXT_LAYERS = re.compile(r"attn2\.to_[kv]$")  # the layers whose input is the text encoder's output


def text_layers(unet) -> list:
    """The peft LoRA layers of ``unet`` that read the text: ``[(name, layer)]``."""
    from peft.tuners.lora import LoraLayer

    unet = getattr(unet, "module", unet)  # a wrapped model's own module
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer) and TEXT_LAYERS.search(n)]


def benign_prompts(components, data, n: int, seed: int = 0) -> list:
    """The prompts R_text holds: the preserve images' prompts and, on the toy model, the captions of
    ``n`` rendered scenes without the target (seeds apart from the benchmarks' and D_FT's)."""
    prompts = list(dict.fromkeys(getattr(getattr(data, "preserve", None), "prompts", None) or []))
    if components.is_toy and n > 0:
        from .resalign_data import benign_scenes

        prompts += [s.caption for s in benign_scenes(data.target, n, 8_000_000 + seed)]
    return list(dict.fromkeys(prompts))


class TextRetain:
    """R_text over the LoRA layers of ``unet`` that read the text, on the prompts' encoder outputs."""

    def __init__(self, unet, components, prompts: list):
        import torch

        from ..dag.conditioning import encode

        self.layers = text_layers(unet)  # none (a feed-forward LoRA): the keys and values cannot change, R_text = 0
        if not prompts:
            raise ErasekitError("text_retain needs benign prompts: give preserve images (their prompts count) or set it to 0.")
        with torch.no_grad():  # [N, L, D]
            self.states = torch.cat([encode(components, prompts[i:i + 64]).states.float().cpu()
                                     for i in range(0, len(prompts), 64)]) if self.layers else None
        self._base = None  # per layer: E_c ||W_l c||^2 over all the prompts, computed once

    def __call__(self, n: int = 32):
        """R_text on ``n`` prompts drawn from the set (all of them when it holds fewer)."""
        import torch

        if not self.layers:
            return torch.zeros(())
        device = self.layers[0][1].base_layer.weight.device
        if self._base is None:
            with torch.no_grad():
                c = self.states.to(device)
                self._base = [m.base_layer(c).float().pow(2).sum(-1).mean().clamp_min(1e-12) for _, m in self.layers]
        idx = torch.randperm(len(self.states))[:n]
        c = self.states[idx].to(device)
        total = 0.0
        for (_, m), base in zip(self.layers, self._base):
            delta = sum(m.lora_B[a](m.lora_A[a](c.to(m.lora_A[a].weight.dtype))) * m.scaling[a]
                        for a in m.active_adapters if a in m.lora_A)
            total = total + delta.float().pow(2).sum(-1).mean() / base
        return total / len(self.layers)
