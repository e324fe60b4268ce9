"""Cross-attention heatmaps of chosen prompt words in Automatic1111, read without replacing its attention.

Forward pre-hooks on the coarse cross-attention layers compute, from each call's image states and text
states, the head-averaged attention of every pixel to every prompt token (the layer's own ``to_q`` /
``to_k``); the first prompt row of each image is summed over the steps. After sampling,
:func:`erasekit.attention.token_heatmap` turns the chosen tokens' maps into one heatmap per image.
"""

from __future__ import annotations

from .hooks import LayerHooks, coarse_attention_layers, step_rows


class A1111AttentionRecorder(LayerHooks):
    """Sum over the steps of ``[B, h, w, tokens]`` attention maps per coarse layer (the first prompt of each image)."""

    def __init__(self, p):
        super().__init__(coarse_attention_layers(p.sd_model.model.diffusion_model))
        self.sums: dict[str, object] = {}
        self.calls: dict[str, list] = {}
        self.rows = None  # (B, [(start, end)]) of this step
        self.latent_hw = None

    def _pre_hook(self, name):
        def read(module, args, kwargs):
            if self.rows is None:
                return None
            import torch

            x = args[0]
            context = kwargs.get("context", args[1] if len(args) > 1 else None)
            if context is None or context.shape[0] != x.shape[0]:
                return None
            with torch.no_grad():
                b, n, inner = x.shape
                heads = module.heads
                q = module.to_q(x).reshape(b, n, heads, -1).transpose(1, 2).float()
                k = module.to_k(context).reshape(b, context.shape[1], heads, -1).transpose(1, 2).float()
                probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(1)  # [rows, n, tokens]
            self.calls.setdefault(name, []).append(probs.cpu())
            return None

        return read

    def on_denoiser(self, params):
        self.rows = step_rows(params)
        self.latent_hw = tuple(params.x.shape[-2:])
        self.calls = {}

    def on_after_cfg(self, params):
        """Add this step's maps: per layer, each image's first prompt row, as ``[B, h, w, tokens]``."""
        from erasekit.attention import grid_shape

        if self.rows is None:
            return
        _, spans = self.rows
        for name, calls in self.calls.items():
            import torch

            rows = torch.cat(calls)
            first = rows[[a for a, _ in spans]]  # [B, n, tokens]
            _, h, w = grid_shape(self.latent_hw, first.shape[1])
            m = first.reshape(first.shape[0], h, w, first.shape[-1])
            self.sums[name] = m if name not in self.sums else self.sums[name] + m
        self.rows, self.calls = None, {}

    def heatmaps(self, token_positions, size):
        """``[B, H, W]`` in [0, 1]: the chosen tokens' attention summed over the steps, per image."""
        from erasekit.attention import token_heatmap

        return token_heatmap({name: [m] for name, m in self.sums.items()}, token_positions, size)


def word_positions(cond_stage_model, prompt: str, words: str) -> list[int]:
    """Positions in the first 77-token chunk of ``prompt`` of each word's own token ids (A1111's tokenizer,
    emphasis syntax such as ``(red circle:1.2)`` parsed as the web UI parses it)."""
    model = cond_stage_model.embedders[0] if hasattr(cond_stage_model, "embedders") else cond_stage_model
    chunks, _ = model.tokenize_line(prompt)
    tokens = chunks[0].tokens if chunks else []
    positions = set()
    for word in words.replace(",", " ").split():
        want = model.tokenize([word])[0]
        for i in range(len(tokens) - len(want) + 1) if want else ():
            if tokens[i:i + len(want)] == want:
                positions.update(range(i, i + len(want)))
    if not positions:
        raise ValueError(f"None of the words '{words}' occurs in the prompt '{prompt}'; type words from the prompt.")
    return sorted(positions)


on_denoiser = A1111AttentionRecorder.callback("on_denoiser")
on_after_cfg = A1111AttentionRecorder.callback("on_after_cfg")
