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
        ids, weights, word_ids = [tok.bos_token_id], [1.0], [0]
        for segment, weight in comfy.sd1_clip.token_weights(comfy.sd1_clip.escape_important(text), 1.0):
            segment = comfy.sd1_clip.unescape_important(segment)
            for word in segment.split():
                word_index = len({w for w in word_ids if w}) + 1
                for t in tok(word, add_special_tokens=False).input_ids:
                    ids.append(t), weights.append(weight), word_ids.append(word_index)
        n = self.max_length
        ids, weights, word_ids = ids[: n - 1], weights[: n - 1], word_ids[: n - 1]
        ids.append(tok.eos_token_id), weights.append(1.0), word_ids.append(0)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        while len(ids) < n:
            ids.append(pad), weights.append(1.0), word_ids.append(0)
        rows = list(zip(ids, weights, word_ids)) if return_word_ids else list(zip(ids, weights))
        return {"l": [rows]}

    def untokenize(self, token_weight_pair):
        return [(p, self.tokenizer.convert_ids_to_tokens(p[0])) for p in token_weight_pair]

    def state_dict(self):
        return {}


class _TextEncoderAdapter(torch.nn.Module):
    """ComfyUI ``cond_stage_model`` interface over a transformers CLIP text encoder."""

    def __init__(self, text_encoder, empty_ids: list[int]):
        super().__init__()
        self.transformer = text_encoder
        self.empty_ids = empty_ids
        self.dtypes = {next(text_encoder.parameters()).dtype}
        self.options = {}

    def reset_clip_options(self):
        self.options = {}

    def set_clip_options(self, options):
        self.options.update(options)

    def _encode(self, ids: list[list[int]]):
        device = next(self.transformer.parameters()).device
        out = self.transformer(torch.tensor(ids, device=device))
        pooled = getattr(out, "pooler_output", None)
        return out.last_hidden_state.float(), None if pooled is None else pooled.float()

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
        return self.transformer.load_state_dict(sd, strict=False)


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
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters(), samples).dtype  # the toy VAE has no parameters
        x = self.vae.decode(samples.to(dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels[..., :3].movedim(-1, 1) * 2 - 1
        return self.vae.encode(x).latent_dist.mode().cpu()

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
