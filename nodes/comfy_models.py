"""Diffusers components as ComfyUI MODEL, CLIP and VAE objects.

ComfyUI's own loaders only know the configurations of released checkpoints. The toy model
(and any diffusers folder with an unusual text encoder or latent space) is loaded by Erasekit
with diffusers, then handed to ComfyUI here:
- MODEL: ComfyUI's own UNetModel with the weights (``comfy_bridge.load_diffusers_unet``);
- CLIP: ``comfy.sd.CLIP`` around a small module that runs the transformers text encoder and
  honours ComfyUI's prompt weights "(word:1.2)" the way ComfyUI's SD1 encoder does;
- VAE: a ``comfy.sd.VAE`` whose encode/decode call the diffusers VAE (pixels BHWC in [0, 1]).
"""

from __future__ import annotations

import torch

from .comfy_bridge import load_diffusers_unet


class _TokenizerAdapter:
    """ComfyUI tokenizer interface over a transformers tokenizer.

    ``tokenize_with_weights`` returns ``{"l": [[(token_id, weight, word_id), ...]]}``: one chunk
    padded to the tokenizer's max length; ``word_id`` counts whitespace-separated words from 1
    (0 for special tokens), as ComfyUI's SDTokenizer does, so word -> token lookups work alike.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = min(tokenizer.model_max_length, max_length)

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        import comfy.sd1_clip

        tok = self.tokenizer
        ids, weights, word_ids = [], [], []
        for segment, weight in comfy.sd1_clip.token_weights(comfy.sd1_clip.escape_important(text), 1.0):
            segment = comfy.sd1_clip.unescape_important(segment)
            for word in segment.split():
                word_index = len(set(word_ids)) + 1
                for t in tok(word, add_special_tokens=False).input_ids:
                    ids.append(t), weights.append(weight), word_ids.append(word_index)
        # chunks of max_length - 2 tokens between start and end, as ComfyUI's SDTokenizer: a long prompt
        # is encoded chunk by chunk and the states concatenated, not cut off
        n = self.max_length
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        chunks = []
        for s in range(0, max(len(ids), 1), n - 2):
            body = list(zip(ids[s:s + n - 2], weights[s:s + n - 2], word_ids[s:s + n - 2]))
            rows = [(tok.bos_token_id, 1.0, 0)] + body + [(tok.eos_token_id, 1.0, 0)]
            rows += [(pad, 1.0, 0)] * (n - len(rows))
            chunks.append(rows if return_word_ids else [r[:2] for r in rows])
        return {"l": chunks}

    def untokenize(self, token_weight_pair):
        return [(p, self.tokenizer.convert_ids_to_tokens(p[0])) for p in token_weight_pair]

    def state_dict(self):
        return {}


class _Level(torch.nn.Module):
    """One named level of the module tree (its children are the keyword arguments)."""

    def __init__(self, **children):
        super().__init__()
        for name, module in children.items():
            self.add_module(name, module)


class _TextEncoderAdapter(torch.nn.Module):
    """ComfyUI ``cond_stage_model`` interface over a transformers CLIP text encoder.

    The encoder sits at ``clip_l.transformer.text_model``, where ComfyUI's SD1 CLIP has it: ComfyUI maps
    a LoRA's ``lora_te_*`` keys to weights by those names (``comfy.lora.model_lora_keys_clip``)."""

    def __init__(self, text_encoder, empty_ids: list[int]):
        super().__init__()
        inner = text_encoder if hasattr(text_encoder, "text_model") else _Level(text_model=text_encoder)  # transformers 5
        self.clip_l = _Level(transformer=inner)
        self.empty_ids = empty_ids
        self.dtypes = {next(text_encoder.parameters()).dtype}
        self.options = {}

    @property
    def transformer(self):
        return self.clip_l.transformer

    def reset_clip_options(self):
        self.options = {}

    def set_clip_options(self, options):
        self.options.update(options)

    def _encode(self, ids: list[list[int]]):
        te = self.transformer if not isinstance(self.transformer, _Level) else self.transformer.text_model
        device = next(te.parameters()).device
        layer = self.options.get("layer")  # CLIP Set Last Layer: -2 = the states one layer before the last
        if layer is not None and abs(layer) > te.config.num_hidden_layers:  # ComfyUI's rule: past the depth, the last
            layer = None
        out = te(torch.tensor(ids, device=device), output_hidden_states=layer is not None)
        pooled = getattr(out, "pooler_output", None)
        z = out.last_hidden_state
        if layer is not None and layer != -1:  # as ComfyUI's SD1 CLIP: that layer's states, then the final norm
            model = getattr(te, "text_model", te)
            z = model.final_layer_norm(out.hidden_states[layer])
        return z.float(), None if pooled is None else pooled.float()

    @torch.no_grad()
    def encode_token_weights(self, token_weight_pairs):
        """Weighted prompt tokens -> (cond [1, n*L, D], pooled [1, D]).

        A weight w moves that token's state along (z - z_empty) like ComfyUI's SD1 encoder:
        z' = z_empty + w (z - z_empty).
        """
        chunks = token_weight_pairs["l"]
        ids = [[t[0] for t in c] for c in chunks]
        z, pooled = self._encode(ids)
        weights = torch.tensor([[t[1] for t in c] for c in chunks], dtype=z.dtype, device=z.device)
        if (weights != 1.0).any():
            z_empty, _ = self._encode([self.empty_ids])
            z = z_empty + weights[..., None] * (z - z_empty)
        cond = z.reshape(1, -1, z.shape[-1])
        return cond, (pooled[:1] if pooled is not None else None)

    def load_sd(self, sd):
        return torch.nn.Module.load_state_dict(self, sd, strict=False)  # keys as ComfyUI names them: clip_l.transformer...


def make_clip(text_encoder, tokenizer):
    """A ``comfy.sd.CLIP`` for a transformers text encoder + tokenizer."""
    import comfy.sd
    import comfy.supported_models_base

    max_length = text_encoder.config.max_position_embeddings
    adapter = _TokenizerAdapter(tokenizer, max_length)
    empty = [t[0] for t in adapter.tokenize_with_weights("")["l"][0]]

    class ClipModel(_TextEncoderAdapter):
        def __init__(self, device=None, dtype=None, model_options=None, **kwargs):
            super().__init__(text_encoder, empty)

    class Tokenizer(_TokenizerAdapter):
        def __init__(self, embedding_directory=None, tokenizer_data=None, **kwargs):
            super().__init__(tokenizer, max_length)

    target = comfy.supported_models_base.ClipTarget(Tokenizer, ClipModel)
    return comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})


class DiffusersVAE:
    """ComfyUI VAE interface over a diffusers VAE (``AutoencoderKL`` or the toy model's map).

    ComfyUI hands decode() raw VAE latents (its latent format already undid the scaling) and
    encode() pixels BHWC in [0, 1]; diffusers works in BCHW [-1, 1].
    """

    def __init__(self, vae):
        self.vae = vae
        self.latent_channels = vae.config.latent_channels
        self.downscale_ratio = self.upscale_ratio = 2 ** (len(vae.config.block_out_channels) - 1)
        self.output_channels = 3
        self.latent_dim = 2
        self.working_dtypes = [torch.float32]

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def temporal_compression_decode(self):
        return None

    @torch.no_grad()
    def _decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Latents BCHW -> pixels BCHW in [0, 1] (CPU, float32)."""
        dtype = next(self.vae.parameters(), samples).dtype  # the toy VAE has no parameters
        x = self.vae.decode(samples.to(dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1).cpu()

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels BCHW in [0, 1] -> latents BCHW (CPU, float32)."""
        dtype = next(self.vae.parameters(), pixels).dtype
        return self.vae.encode((pixels[:, :3] * 2 - 1).to(dtype)).latent_dist.mode().float().cpu()

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return self._decode(samples).movedim(1, -1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._encode(pixels.movedim(-1, 1))

    def decode_tiled(self, samples, tile_x=64, tile_y=64, overlap=16, **kwargs):
        """VAE Decode (Tiled): ComfyUI's own tiling (comfy.utils.tiled_scale) over this VAE."""
        import comfy.utils

        return comfy.utils.tiled_scale(samples, self._decode, tile_x, tile_y, overlap, upscale_amount=self.upscale_ratio,
                                       out_channels=self.output_channels).movedim(1, -1)

    def encode_tiled(self, pixels, tile_x=512, tile_y=512, overlap=64, **kwargs):
        """VAE Encode (Tiled), as :meth:`decode_tiled`."""
        import comfy.utils

        return comfy.utils.tiled_scale(pixels.movedim(-1, 1), self._encode, tile_x, tile_y, overlap,
                                       upscale_amount=1 / self.downscale_ratio, out_channels=self.latent_channels)

    def get_sd(self):
        return self.vae.state_dict()


def to_comfy(components):
    """(MODEL, CLIP, VAE) for an :class:`erasekit.models.Components`."""
    if len(components.text_encoders) != 1:
        raise ValueError(
            "This loader handles one-text-encoder models (SD1.x/2.x-style, the toy model); "
            "load SDXL checkpoints with ComfyUI's Load Checkpoint."
        )
    scale = getattr(components.vae.config, "scaling_factor", 0.18215)
    model = load_diffusers_unet(components.unet, components.scheduler, latent_scale=scale)
    # the base model's family, for the LoRA and guideline-embedding checks of later nodes
    model.model_options["transformer_options"]["erasekit_architecture"] = components.architecture
    clip = make_clip(components.text_encoder, components.tokenizer)
    return model, clip, DiffusersVAE(components.vae)
